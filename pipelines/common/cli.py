"""Helpers for the entry scripts' flags: the torch device to use, a folder that must be writable."""

import tempfile
from pathlib import Path

import torch

from sagan.errors import UsageError, first_line


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
