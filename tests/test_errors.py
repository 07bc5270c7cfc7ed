import ast
from pathlib import Path

import pytest

from sagan.errors import JobFailed, UserError, command

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    p for p in [*REPO.glob("pipelines/*.py"), *REPO.glob("preprocessing/*.py")] if "__main__" in p.read_text()
)


def _classes(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    return [(n.name, [ast.unparse(b) for b in n.bases]) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]


def test_a_user_error_is_one_line_and_its_exit_code(capsys):
    @command
    def main(argv=None):
        raise UserError("data.train_shards: no shards at /x; run preprocessing/shard_imagenet.py first")

    assert main() == 2
    assert (
        capsys.readouterr().err
        == "error: data.train_shards: no shards at /x; run preprocessing/shard_imagenet.py first\n"
    )


def test_an_error_raised_in_a_ray_task_prints_its_cause_not_the_remote_traceback(capsys):
    class TaskError(UserError):  # what ray.get raises: a subclass of the cause's class, the traceback as message
        def __init__(self, cause):
            super().__init__("ray::verify() (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):\n  ...")
            self.cause = cause

    @command
    def main(argv=None):
        raise TaskError(JobFailed("shard s-000001.tar: sha256 differs from the manifest's"))

    assert main() == 1
    assert capsys.readouterr().err == "error: shard s-000001.tar: sha256 differs from the manifest's\n"


def test_a_failed_job_exits_1(capsys):
    @command
    def main(argv=None):
        raise JobFailed("verification failed")

    assert main() == 1
    assert capsys.readouterr().err == "error: verification failed\n"


def test_ctrl_c_exits_130(capsys):
    @command
    def main(argv=None):
        raise KeyboardInterrupt

    assert main() == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback():
    @command
    def main(argv=None):
        return {}["missing"]

    with pytest.raises(KeyError):
        main()


def test_the_return_value_passes_through():
    assert command(lambda argv=None: 0)() == 0


def test_every_error_class_is_a_user_error():
    """Every exception class the project defines derives from UserError (directly or through another)."""
    import importlib

    names = {}
    for path in [*REPO.glob("sagan/**/*.py"), *REPO.glob("pipelines/**/*.py"), *REPO.glob("preprocessing/*.py")]:
        for name, _bases in _classes(path):
            if name.endswith(("Error", "Stopped", "Failed")):
                names[name] = path
    assert len(names) >= 12, sorted(names)
    for name, path in names.items():
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        assert issubclass(getattr(module, name), UserError), f"{name} in {path.relative_to(REPO)}"


def test_one_usage_error_class():
    defined = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and ("UsageError", ["UserError"]) in _classes(p)]
    assert [p.relative_to(REPO).as_posix() for p in defined] == ["sagan/errors.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_scripts_list_no_exception_tuples_and_print_no_errors(script):
    """Errors reach the user through sagan.errors.command alone: no `except (A, B)` lists of our error classes,
    no hand-printed `error:` lines in an entry script."""
    source = script.read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Tuple):
            names = [ast.unparse(e) for e in node.type.elts]
            assert not any(n.endswith(("Error", "Stopped")) and "." not in n and n != "OSError" for n in names), names
    assert 'print(f"error:' not in source and 'print("error:' not in source
    if "def main(" in source:
        assert "@command\ndef main(" in source, f"{script.name}: main must run under sagan.errors.command"
