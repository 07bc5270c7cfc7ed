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
from .config import saved_config
from .errors import UserError, first_line
from .files import atomic_output
from .models import G_ARCH, Generator

FORMAT = "sagan-generator"


def save_generator_file(path: str | Path, G: Generator, kwargs: dict, meta: dict | None = None) -> Path:
    """Write G's weights and `kwargs` (plus `meta`, plain JSON values) to `path` atomically; return the path."""
    header = {"format": FORMAT, "generator": json.dumps(kwargs)}
    header.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def check_metadata(kwargs: dict, tensors: dict) -> None:
    """Raise ValueError when the Generator keyword arguments `kwargs` are invalid (as model.* config values) or
    do not fit the sizes the weights reveal: ch in out_bn, z_dim in the first linear layer, num_classes in the
    first class-conditional batch norm. UserError (a ConfigError) for an invalid value."""
    if not isinstance(kwargs, dict):
        raise ValueError("'generator' is not a dict of keyword arguments")
    names = {"attn_resolutions": "g_attn", "sn": "g_sn"}
    model = saved_config({"model": {names.get(k, k): v for k, v in kwargs.items()}}).model
    arch = G_ARCH[model.resolution]
    in_ch, out_ch = arch["in_mult"][0] * model.ch, arch["out_mult"][-1] * model.ch
    linear = "linear.parametrizations.weight.original" if model.g_sn else "linear.weight"
    for key, implied in (
        ("out_bn.weight", (out_ch,)),
        (linear, (4 * 4 * in_ch, model.z_dim)),
        ("blocks.0.bn1.gain.weight", (model.num_classes, in_ch)),
    ):
        if key in tensors and tuple(tensors[key].shape) != implied:
            raise ValueError(
                f"ch {model.ch}, z_dim {model.z_dim}, num_classes {model.num_classes} make {key} {implied}, "
                f"the weights hold {tuple(tensors[key].shape)}"
            )


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
        kwargs = meta["generator"]
        check_metadata(kwargs, tensors)  # before building: an impossible ch or num_classes would allocate for it
        G = Generator(**kwargs)
    except (ValueError, TypeError, KeyError, UserError) as e:
        raise CheckpointError(f"{path} has damaged SAGAN metadata ({first_line(e)}); export it again") from None
    names = meta.get("class_names")
    if names is not None and not (
        isinstance(names, list) and len(names) == G.num_classes and all(isinstance(n, str) for n in names)
    ):
        raise CheckpointError(
            f"{path} has damaged SAGAN metadata (class_names is not a list of {G.num_classes} names); export it "
            "again, or pass --class-names"
        )
    check_fits(G, tensors, "generator")
    G.load_state_dict(tensors)
    return G.to(device).eval(), meta
