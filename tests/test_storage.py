"""Atomic folder saves: a kill at any point of a save leaves the old or the new complete folder;
manifests catch changed files; saves clean up after themselves."""

import json
import os

import pytest

from prlhf import storage
from prlhf.storage import IntegrityError, recover_folder, save_folder, verify_manifest


def writer(version: str, names=("weights.safetensors", "config.json", "users.json")):
    def write(tmp):
        for n in names:
            (tmp / n).write_text(f"{version}:{n}")
    return write


def contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}


def assert_complete(folder, version, names=("weights.safetensors", "config.json", "users.json")):
    assert verify_manifest(folder, required=True)
    assert {n: contents(folder)[n] for n in names} == {n: f"{version}:{n}" for n in names}


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".prlhf-" in p.name)


def test_save_writes_manifest_and_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    save_folder(target, writer("v1", ("a.safetensors", "b.json")))
    (target / "checkpoint-5").mkdir()
    (target / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    save_folder(target, writer("v2", ("a.safetensors", "c.json")))  # b.json belongs to v1 only
    assert_complete(target, "v2", ("a.safetensors", "c.json"))
    assert not (target / "b.json").exists()  # no file of the old model survives next to the new one
    assert (target / "checkpoint-5" / "trainer_state.json").read_text() == "{}"  # not part of the save: kept
    assert (target / "notes.txt").read_text() == "mine"
    manifest = json.loads((target / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.safetensors", "c.json"}
    assert leftovers(tmp_path) == []


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception`` handlers)."""


@pytest.mark.parametrize("kill_at", ["writing", "after_manifest", "after_old_aside", "after_new_in", "carrying_over"])
def test_kill_at_any_point_leaves_old_or_new_complete_folder(tmp_path, monkeypatch, kill_at):
    target = tmp_path / "model"
    save_folder(target, writer("v1"))
    (target / "checkpoint-1").mkdir()
    (target / "extra.log").write_text("log")
    real_rename, real_replace, real_rmtree = os.rename, os.replace, storage.shutil.rmtree
    renames = []

    def rename(src, dst):
        renames.append((src, dst))
        if kill_at == "after_old_aside" and len(renames) == 1:
            real_rename(src, dst)
            raise Killed
        real_rename(src, dst)
        if kill_at == "after_new_in" and len(renames) == 2:
            raise Killed

    def replace(src, dst):
        real_replace(src, dst)
        if kill_at == "carrying_over" and str(dst).endswith("checkpoint-1"):
            raise Killed

    def write(tmp):
        writer("v2")(tmp)
        if kill_at == "writing":
            (tmp / "weights.safetensors").write_text("v2:half")
            raise Killed

    def manifest(folder, names=None):
        out = real_write_manifest(folder, names)
        if kill_at == "after_manifest":
            raise Killed
        return out

    real_write_manifest = storage.write_manifest
    monkeypatch.setattr(storage.os, "rename", rename)
    monkeypatch.setattr(storage.os, "replace", replace)
    monkeypatch.setattr(storage, "write_manifest", manifest)
    # a killed process runs no cleanup: the temporary folder stays behind
    monkeypatch.setattr(storage.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Killed):
        save_folder(target, write)
    monkeypatch.undo()
    assert storage.shutil.rmtree is real_rmtree

    # what a later load (or save) sees after recovery
    recover_folder(target)
    if kill_at in ("writing", "after_manifest"):  # the new folder was never moved in: the old one stands
        assert_complete(target, "v1")
    else:  # the old folder was already set aside: the new, complete one takes its place
        assert_complete(target, "v2")
    assert (target / "checkpoint-1").is_dir() and (target / "extra.log").read_text() == "log"
    # the next save cleans every temporary folder
    save_folder(target, writer("v3"))
    assert_complete(target, "v3")
    assert leftovers(tmp_path) == []


def test_manifest_names_the_changed_or_missing_file(tmp_path):
    target = save_folder(tmp_path / "m", writer("v1"))
    (target / "config.json").write_text("changed")
    with pytest.raises(IntegrityError, match=r"config\.json does not match its SHA-256"):
        verify_manifest(target)
    (target / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"config\.json is listed in manifest\.json but missing"):
        verify_manifest(target)
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable manifest"):
        verify_manifest(target)


def test_legacy_folder_model_files_are_replaced_and_tmp_save_folders_removed(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    (target / "adapter_model.safetensors").write_text("old adapter")  # prlhf 0.1, no manifest
    (target / ".tmp-save-abc").mkdir()
    (target / "checkpoint-3").mkdir()
    save_folder(target, writer("v2", ("model.safetensors",)))
    assert not (target / "adapter_model.safetensors").exists()
    assert not (target / ".tmp-save-abc").exists()
    assert (target / "checkpoint-3").is_dir()


def test_a_file_in_the_way_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        storage.check_output_path(tmp_path / "f" / "sub", "output_dir")


def test_atomic_writes_get_the_usual_file_mode_not_mkstemps_private_one(tmp_path):
    import os

    from prlhf.storage import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
