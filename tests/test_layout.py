"""The house rules a maintainer relies on: where code lives, how big a module gets, which way imports point."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sagan", "pipelines", "preprocessing")
SCRIPTS = {"train.py", "tune.py", "evaluate.py", "sample.py", "replay_tracking.py"}


def modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (function-local imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_the_model_library_imports_neither_ray_nor_mlflow():
    for path in (REPO / "sagan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad = [n for n in names if n.split(".")[0] in ("ray", "mlflow", "pipelines")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in REPO.glob("*/**/*.py")
        if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_pipelines_top_level_holds_only_the_entry_scripts():
    top = {p.name for p in (REPO / "pipelines").glob("*.py")} - {"__init__.py"}
    assert top == SCRIPTS


def test_entry_scripts_are_thin():
    for name in SCRIPTS:
        lines = len((REPO / "pipelines" / name).read_text().splitlines())
        assert lines <= 200, f"pipelines/{name} has {lines} lines"


def test_library_code_does_not_import_the_entry_scripts():
    scripts = {f"pipelines.{Path(s).stem}" for s in SCRIPTS}
    for name, deps in import_graph().items():
        assert not deps & scripts, f"{name} imports {sorted(deps & scripts)}"
    for path in (REPO / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in scripts:
                names = {a.name for a in node.names}
                assert names <= {"main", "DEMO_CONFIG", "OVERRIDABLE"}, (
                    f"{path.name} imports {names} from {node.module}"
                )
