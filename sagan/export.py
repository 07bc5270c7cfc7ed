"""The generator as one safetensors file: its weights, and in the file's metadata the keyword arguments of
`sagan.models.Generator` that fit them, so a user needs no config or checkpoint code to load it:

    G, meta = load_generator_file("G.safetensors")                        # this package
    G = Generator(**json.loads(safe_open(path, "pt").metadata()["generator"])); G.load_state_dict(load_file(path)); G.eval()

Safetensors holds tensors and strings only: loading runs no code from the file.
"""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, check_fits
from .files import atomic_output
from .models import Generator

FORMAT = "sagan-generator"


def save_generator_file(path: str | Path, G: Generator, kwargs: dict, meta: dict | None = None) -> Path:
    """Write G's weights and `kwargs` (plus `meta`, plain JSON values) to `path` atomically; return the path."""
    header = {"format": FORMAT, "generator": json.dumps(kwargs)}
    header.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def load_generator_file(path: str | Path, device="cpu") -> tuple[Generator, dict]:
    """The generator in a file written by `save_generator_file`, in eval mode on `device`, and its metadata
    ({"generator": kwargs, ...meta}). CheckpointError for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"generator file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0]})") from None
    if header.get("format") != FORMAT or "generator" not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but not a SAGAN generator (no '{FORMAT}' metadata); "
            "export one with pipelines/sample.py --export-safetensors"
        )
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
        G = Generator(**meta["generator"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path} has damaged SAGAN metadata ({str(e).splitlines()[0]}); export it again"
        ) from None
    check_fits(G, tensors, "generator")
    G.load_state_dict(tensors)
    return G.to(device).eval(), meta
