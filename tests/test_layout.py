"""The package's layout: no import circle (imports inside functions count too), so its modules stack in floors
with every arrow pointing down; no module past the size one sitting can read; the post-run tools never import
the runner."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "svd_batch"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_post_run_tools_depend_on_the_run_folder_not_the_runner():
    g = graph()

    def reach(m: str, seen: set[str]) -> set[str]:
        for n in g[m] - seen:
            seen.add(n)
            reach(n, seen)
        return seen

    for tool in ("svd_batch.commands.report", "svd_batch.commands.score", "svd_batch.commands.status",
                 "svd_batch.commands.verify", "svd_batch.commands.export", "svd_batch.export", "svd_batch.results",
                 "svd_batch.status", "svd_batch.verify"):
        assert "svd_batch.runner" not in reach(tool, set()), tool
