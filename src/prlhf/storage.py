"""Writing files and whole folders so that a kill at any moment leaves the old or the new version,
never a mix, and checking on load that a folder is what was written.

One helper family for every writer in prlhf (model folders, checkpoints, reference caches, data
conversions):

- ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_write_with``: one file, through a
  temporary sibling and ``os.replace``.
- ``save_folder``: a whole folder. Everything is written into a sibling temporary folder
  (``.NAME.prlhf-new-*``) with ``manifest.json`` (each file's SHA-256) last; the old folder is
  renamed aside (``.NAME.prlhf-old``), the new one renamed into place, and entries of the old folder
  that were not part of the old save (checkpoints, logs, a user's own files) are moved across
  before the old folder is deleted. ``recover_folder`` finishes or rolls back a swap that a kill
  interrupted; ``save_folder`` and the loaders call it first.
- ``verify_manifest``: every file listed in ``manifest.json`` exists and has its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_NEW = ".prlhf-new-"
_OLD = ".prlhf-old"
# files a model folder written before manifests existed may hold (legacy folders: not carried over)
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".jinja", ".model", ".txt", ".md", ".gguf")


class IntegrityError(ValueError):
    """A saved folder does not match its manifest (damaged, truncated or changed after saving)."""


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); a written file gets the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files_under(folder: Path) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Write ``manifest.json`` (``{"files": {name: sha256}}``) for ``names`` (default: every file)."""
    folder = Path(folder)
    names = _files_under(folder) if names is None else sorted(names)
    manifest = {"files": {n: sha256_file(folder / n) for n in names}}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The parsed manifest, ``None`` when the folder has none; a damaged one is an ``IntegrityError``."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path}: not a prlhf manifest (no 'files' object)")
    return manifest


def verify_manifest(folder: str | os.PathLike, names: list[str] | None = None, required: bool = False) -> bool:
    """Check the files listed in ``manifest.json`` (or only ``names`` among them) against their
    SHA-256. Returns False when there is no manifest (an error if ``required``)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if required:
            raise IntegrityError(f"{folder}: no {MANIFEST_NAME}; the folder was not written completely by prlhf")
        return False
    files = manifest["files"]
    for name in (files if names is None else [n for n in names if n in files]):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{folder}: {name} is listed in {MANIFEST_NAME} but missing "
                                 "(the folder is incomplete or was changed after saving)")
        if sha256_file(path) != files[name]:
            raise IntegrityError(f"{folder}: {name} does not match its SHA-256 in {MANIFEST_NAME} "
                                 "(the file is damaged, truncated or was changed after saving)")
    return True


def check_output_path(path: str | os.PathLike, what: str) -> None:
    """Refuse an output path that can never be written: one below an existing file, or (for a
    folder) a path that is itself a file."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != path:
                raise NotADirectoryError(f"{what} {path}: {parent} is a file, not a folder")
            return


def _old_path(target: Path) -> Path:
    return target.parent / f".{target.name}{_OLD}"


def _new_folders(target: Path) -> list[Path]:
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}{_NEW}*"), key=lambda p: p.stat().st_mtime)


def _carry_over(old: Path, target: Path) -> None:
    """Move entries of the previous folder that were not part of its saved model into ``target``,
    then delete the previous folder."""
    try:
        manifest = read_manifest(old)
    except IntegrityError:
        manifest = {"files": {}}
    saved = {n.split("/")[0] for n in manifest["files"]} if manifest is not None else None
    present = set(os.listdir(target))
    for name in os.listdir(old):
        if name in present or name == MANIFEST_NAME:
            continue
        src = old / name
        if saved is not None and name in saved:
            continue
        if saved is None and not src.is_dir() and name.endswith(MODEL_SUFFIXES):
            continue  # a folder from before manifests: its model files are replaced, not kept
        os.replace(src, target / name)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: str | os.PathLike, clean: bool = False) -> None:
    """Finish a folder swap that a kill interrupted: if ``target`` is missing, the newest complete
    new folder (one with a manifest) or else the previous folder is renamed into place; a previous
    folder next to a present target has its extra entries carried over and is deleted. ``clean``
    also deletes incomplete temporary folders (writers only: a reader must not delete a folder
    another process is still writing)."""
    target = Path(os.path.abspath(target))
    old = _old_path(target)
    news = _new_folders(target)
    if not target.exists():
        complete = [p for p in news if (p / MANIFEST_NAME).is_file()]
        source = complete[-1] if complete else (old if old.is_dir() else None)
        if source is not None:
            logger.warning("%s: completing an interrupted save (from %s)", target, source.name)
            try:
                os.rename(source, target)
            except FileNotFoundError:  # another process finished it first
                pass
    if old.is_dir() and target.is_dir():
        _carry_over(old, target)
    if clean:
        for p in _new_folders(target):
            shutil.rmtree(p, ignore_errors=True)
        if target.is_dir():  # temporary folders of prlhf 0.1's per-file saves
            for p in target.glob(".tmp-save-*"):
                shutil.rmtree(p, ignore_errors=True)


def save_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a whole folder atomically: ``write(tmp)`` fills a sibling temporary folder, which gets
    ``manifest.json`` and then replaces ``target``. A kill at any point leaves the previous complete
    folder or the new complete one (after ``recover_folder``, which every save and load runs)."""
    target = Path(os.path.abspath(target))  # '.' and '..' have no name to swap
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target, clean=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_NEW}", dir=target.parent))
    try:
        write(tmp)
        for name in _files_under(tmp):
            _fsync(tmp / name)
        write_manifest(tmp)
        _fsync(tmp)
        old = _old_path(target)
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except FileNotFoundError:
            if not target.is_dir():  # a reader's recover_folder may have moved it in already
                raise
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recover_folder(target)
    return target
