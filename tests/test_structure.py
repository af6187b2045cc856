"""The package's shape: no import cycle (imports inside functions and under TYPE_CHECKING count),
every module on a floor above everything it imports, and no module over 450 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prlhf"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every prlhf module ``path`` imports, wherever the import statement sits."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module] if node.module and node.module.startswith("prlhf") else []
            for t in names:
                # "from .pkg import module" names a module; "from .module import name" the module
                out.add(t if module_path(t) else t.rsplit(".", 1)[0])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("prlhf"))
    return {m for m in out if module_path(m) and m != name}


def module_path(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for p in (SRC.parent / rel.with_suffix(".py"), SRC.parent / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for one that imports no prlhf module, else one above the highest it
    imports. Raises ``ValueError`` naming a cycle."""
    floor: dict[str, int] = {}
    visiting: list[str] = []

    def visit(m: str) -> int:
        if m in floor:
            return floor[m]
        if m in visiting:
            raise ValueError("import cycle: " + " -> ".join(visiting[visiting.index(m):] + [m]))
        visiting.append(m)
        # a package's __init__ re-exports its modules; the modules do not count it as above them
        deps = {d for d in graph[m] if not (m.startswith(d + ".") and module_path(d).name == "__init__.py")}
        floor[m] = 1 + max((visit(d) for d in deps), default=-1)
        visiting.pop()
        return floor[m]

    for m in graph:
        visit(m)
    return floor


def test_import_graph_parser_reads_function_level_and_relative_imports():
    f = SRC / "cli.py"
    assert {"prlhf.config.parse", "prlhf.config.commands"} <= imports_of(f)  # top-level and inside functions


def test_no_import_cycle_and_every_module_on_a_floor():
    graph = import_graph()
    floor = floors(graph)  # raises on a cycle
    for m, deps in graph.items():
        for d in deps:
            if m.startswith(d + "."):
                continue
            assert floor[d] < floor[m], f"{m} (floor {floor[m]}) imports {d} (floor {floor[d]})"


def test_floors_detect_a_cycle():
    with pytest.raises(ValueError, match="import cycle"):
        floors({"prlhf.a": {"prlhf.b"}, "prlhf.b": {"prlhf.a"}})


def test_no_module_over_450_lines():
    long = {module_name(p): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


if __name__ == "__main__":  # print the floors: python tests/test_structure.py
    graph = import_graph()
    for m, f in sorted(floors(graph).items(), key=lambda kv: (kv[1], kv[0])):
        lines = len(module_path(m).read_text(encoding="utf-8").splitlines())
        print(f"{f:3d}  {m:40s} {lines:5d}  <- {', '.join(sorted(d.removeprefix('prlhf.') for d in graph[m]))}")
