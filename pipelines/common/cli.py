"""Helpers for the entry scripts' flags: the config and its overrides, the torch device to use, a folder that
must be writable (on a disk or on object storage), a flag that takes only a local file."""

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from sagan.errors import UsageError, first_line
from sagan.folder import Folder
from sagan.storage import check_storage, is_url


def pick_device(name: str):
    """cuda when asked for or (auto) available, else cpu; UsageError for cuda on a machine without it."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {name} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but torch sees no GPU here; use --device cpu, or submit with --entrypoint-num-gpus 1"
        )
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def check_writable(folder: Path, flag: str) -> None:
    """UsageError unless files can be created in `folder` (made when missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"{flag} {folder} is not a writable folder ({e.strerror or first_line(e)}); choose another"
        ) from None


def local_file(value: str | None, flag: str, instead: str) -> None:
    """UsageError for a URL given to a flag that reads or writes a file on this machine; `instead`: what to do."""
    if is_url(value):
        raise UsageError(f"{flag} {value} is a URL, but {flag} takes a file on this machine; {instead}")


@contextmanager
def staged_output(out: str, flag: str):
    """(local folder to write in, how to name a file written there) for an output folder `out`: the folder itself,
    or for object storage (s3://...) a temporary folder whose files are uploaded under `out` when the block
    succeeds, each object complete or absent. Checked first: a folder where nothing can be written, or a bucket
    that cannot be used, is one line."""
    if not is_url(out):
        folder = Path(out).expanduser()
        check_writable(folder, flag)
        yield folder, str
        return
    check_storage(out, flag)
    remote = Folder(out)
    with tempfile.TemporaryDirectory(prefix="sagan-out-") as tmp:
        staging = Path(tmp)
        yield staging, lambda path: remote.url(Path(path).relative_to(staging).as_posix())
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            remote.upload(path.relative_to(staging).as_posix(), str(path))


def config_args(prog: str, description: str, demo_config: Path, example: str, argv=None) -> argparse.Namespace:
    """The flags of a script that runs on the whole config (train.py, tune.py): --config (default `demo_config`),
    --print-config and `key=value` overrides (`example` shows some)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help=f"YAML config (default: configs/{demo_config.name})")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved config (defaults, then --config, then the overrides) as YAML and exit",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    return p.parse_args(argv)
