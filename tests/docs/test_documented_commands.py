"""Every shell block of README.md and docs/*.md runs as written, or is marked as one that cannot run
here and has its flags checked.

Each ```bash block is preceded by a marker line:

- ``<!-- doc-test: run -->``: its commands run in order, as written, in one temporary folder per
  document (earlier blocks' outputs are there for later ones), on tiny-llama and the files the docs
  themselves create. ``prlhf ...`` and ``python FILE.py`` run in this process (the same argv, without
  paying the import of torch per command); other lines (``cat > FILE <<'EOF'``, ``echo ... > FILE``)
  run in bash. A server (``prlhf serve``) is not started: its flags are checked.
- ``<!-- doc-test: flags (why) -->``: the block needs something this test cannot give it (SmolLM2,
  a GPU, data outside the repository, minutes of running, a network endpoint). Each ``prlhf``
  command's flags must be accepted by ``--help`` of the same subcommand (also behind ``accelerate
  launch ... -m prlhf.cli``), each ``python SCRIPT.py`` / ``python -m prlhf.X`` must accept its flags
  in its own ``--help``, and every repository path it names (recipes/, configs/, examples/,
  benchmarks/, scripts/) must exist.

A block without a marker fails the test, so a new example cannot go untested.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKER = re.compile(r"<!--\s*doc-test:\s*(run|flags)\b\s*(.*?)\s*-->")
REPO_DIRS = ("recipes/", "configs/", "examples/", "benchmarks/", "scripts/")
SHELL_ONLY = {"cat", "echo", "mkdir", "ls", "head", "cd", "export", "cp", "rm"}
EXTERNAL = {"pip", "git", "curl", "vllm", "huggingface-cli", "accelerate"}


def shell_blocks(path: Path) -> list[tuple[int, str | None, str, str]]:
    """(line, mode, reason, text) of every ```bash block of a markdown file."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = MARKER.search(lines[k]) if k >= 0 else None
            out.append((start + 1, m.group(1) if m else None, m.group(2) if m else "", "\n".join(lines[start + 1:j])))
            i = j + 1
        else:
            i += 1
    return out


def commands(text: str) -> list[str]:
    """The commands of a block: continuation lines joined, heredocs kept with their command,
    comment-only and blank lines dropped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            line = "\n".join([line, *body, lines[i] if i < len(lines) else heredoc.group(1)])
            i += 1
        out.append(line)
    return out


def needs_shell(cmd: str) -> bool:
    if "\n" in cmd:
        return True
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # $'...' and the like: bash knows
        return any(op in cmd for op in ("|", ">", "<", "&&", ";"))
    return any(t in ("|", "||", "&&", ";", ">", ">>", "<", "&") for t in tokens)


def words(cmd: str, cwd: Path) -> list[str]:
    """The argv bash would give the command (quotes, $'...', comments), without running it."""
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + cmd], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def captured(fn, *args) -> tuple[int | None, str]:
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = fn(*args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
    return code, buf.getvalue()


def prlhf_main(argv: list[str]) -> int:
    from prlhf.cli import main

    return main(argv)


def run_script(path: str, argv: list[str]) -> int:
    old = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old
    return 0


def run_module(name: str, argv: list[str]) -> int:
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = old
    return 0


def flag_names(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def assert_flags(help_text: str, argv: list[str], where: str) -> None:
    for flag in flag_names(argv):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{where}: {flag} is not in --help"


def subcommand(argv: list[str]) -> list[str]:
    head = []
    for a in argv:
        if a.startswith("-"):
            break
        head.append(a)
    return head


def check_paths(argv: list[str], where: str) -> None:
    for a in argv:
        for part in a.split("="):
            if part.startswith(REPO_DIRS):
                assert (ROOT / part.rstrip("/")).exists(), f"{where}: {part} does not exist in the repository"


def check_flags(argv: list[str], where: str) -> None:
    """A command that cannot run here: its flags parse, its repository paths exist."""
    check_paths(argv, where)
    name = argv[0]
    if name == "prlhf":
        code, text = captured(prlhf_main, subcommand(argv[1:]) + ["--help"])
        assert code in (0, None), f"{where}: prlhf {' '.join(subcommand(argv[1:]))} --help failed:\n{text}"
        assert_flags(text, argv[1:], where)
    elif name == "accelerate":
        assert "prlhf.cli" in argv, f"{where}: accelerate launch of something other than prlhf.cli"
        rest = argv[argv.index("prlhf.cli") + 1:]
        check_flags(["prlhf", *rest], where)
    elif name in ("python", "python3"):
        if argv[1:3] == ["-m", "pytest"]:
            return
        if argv[1] == "-m":
            code, text = captured(run_module, argv[2], ["--help"])
            assert code in (0, None), f"{where}: python -m {argv[2]} --help failed:\n{text}"
            assert_flags(text, argv[3:], where)
        else:
            script = ROOT / argv[1]
            assert script.is_file(), f"{where}: {argv[1]} does not exist"
            if argv[1].startswith("benchmarks/") or argv[1].startswith("scripts/"):
                if flag_names(argv[2:]):
                    code, text = captured(run_script, str(script), ["--help"])
                    assert code in (0, None), f"{where}: {argv[1]} --help failed:\n{text}"
                    assert_flags(text, argv[2:], where)
    elif name == "bash":
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
    else:
        assert name in EXTERNAL | SHELL_ONLY, f"{where}: unknown command {name!r} (mark it, or teach this test)"


def split_chain(cmd: str) -> list[str]:
    """`a && b` in a flags block: each part on its own."""
    return [c.strip() for c in cmd.split(" && ")] if "\n" not in cmd else [cmd]


def run_command(cmd: str, cwd: Path, where: str) -> None:
    if needs_shell(cmd):
        out = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{where}: `{cmd}` failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return
    argv = words(cmd, cwd)
    if argv[0] == "prlhf" and argv[1:2] == ["serve"]:
        check_flags(argv, where)
        return
    if argv[0] == "prlhf":
        code, text = captured(prlhf_main, argv[1:])
    elif argv[0] in ("python", "python3") and argv[1].endswith(".py"):
        code, text = captured(run_script, argv[1], argv[2:])
    elif argv[0] in SHELL_ONLY:
        out = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=60)
        code, text = out.returncode, out.stdout + out.stderr
    else:
        raise AssertionError(f"{where}: a run block cannot run {argv[0]!r}; mark the block `flags`")
    assert code in (0, None), f"{where}: `{cmd}` exited {code}:\n{text[-4000:]}"


ALL_BLOCKS = [(doc, *b) for doc in DOCS for b in shell_blocks(doc)]


def test_every_shell_block_is_marked():
    unmarked = [f"{doc.relative_to(ROOT)}:{line}" for doc, line, mode, _, _ in ALL_BLOCKS if mode is None]
    assert not unmarked, "shell blocks without a <!-- doc-test: run|flags (why) --> marker: " + ", ".join(unmarked)
    assert len(ALL_BLOCKS) > 10


def test_flags_blocks_say_why():
    for doc, line, mode, reason, _ in ALL_BLOCKS:
        if mode == "flags":
            assert reason.strip(), f"{doc.relative_to(ROOT)}:{line}: a flags block says why it cannot run"


@pytest.mark.parametrize("doc", [d for d in DOCS if any(b[2] == "flags" for b in ALL_BLOCKS if b[0] == d)],
                         ids=lambda d: d.name)
def test_flags_of_commands_that_cannot_run_here(doc):
    for d, line, mode, _, text in ALL_BLOCKS:
        if d != doc or mode != "flags":
            continue
        for cmd in commands(text):
            for part in split_chain(cmd):
                if needs_shell(part):
                    continue
                argv = words(part, ROOT)
                if argv:
                    check_flags(argv, f"{doc.name}:{line}")


@pytest.mark.parametrize("doc", [d for d in DOCS if any(b[2] == "run" for b in ALL_BLOCKS if b[0] == d)],
                         ids=lambda d: d.name)
def test_run_blocks_in_order(doc, tmp_path, monkeypatch):
    """The run blocks of one document, in order, as written, in a fresh folder that holds links to
    the repository's recipes, examples, configs and benchmarks."""
    for name in ("recipes", "examples", "configs", "benchmarks"):
        if (ROOT / name).exists():
            (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRLHF_CACHE", str(tmp_path / "cache"))
    ran = 0
    for d, line, mode, _, text in ALL_BLOCKS:
        if d != doc or mode != "run":
            continue
        for cmd in commands(text):
            run_command(cmd, tmp_path, f"{doc.name}:{line}")
            ran += 1
    assert ran
