"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True` and checked."""

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .config import SaganConfig, saved_config, to_dict
from .errors import UserError
from .files import atomic_output
from .models import Generator, build_models

FORMAT = "sagan-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("step", "config", "G", "D", "G_ema", "opt_g", "opt_d", "scaler_g", "scaler_d", "extra")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, truncated, or not one of ours."""


def save_checkpoint(path: str | Path, trainer, cfg: SaganConfig, extra: dict | None = None) -> Path:
    """Write a `sagan.step.Trainer`'s full state and `cfg` to `path` atomically; return the path.

    `extra` holds plain values to keep alongside (an MLflow run id, say). A crash mid-write leaves any
    previous file at `path` untouched.
    """
    _check_plain(extra or {}, "extra")  # anything else would save, then fail to load with weights_only
    state = trainer.state_dict()
    state.update(format=FORMAT, version=VERSION, config=to_dict(cfg), extra=dict(extra or {}))
    return atomic_save(state, path)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save `obj` to `path` through a temporary file and a rename; a crash leaves `path` as it was."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or type(value) in (str, int, float, bool)):
        raise TypeError(f"{where}: {type(value).__name__} is not a plain value (str, int, float, bool, None)")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The state dict saved by `save_checkpoint`, loaded without executing code from the file.

    Raises CheckpointError for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False: never repeated here, the file would run the code it names.
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not refused:  # not a pickle of ours at all: junk bytes
            raise CheckpointError(f"checkpoint {path} cannot be read (truncated, or not a torch file)") from None
        raise CheckpointError(
            f"{path} is not a plain checkpoint (it contains code objects: {refused[0]}); it was "
            "not loaded and nothing in it ran. Use a checkpoint written by this project"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, or not a torch file): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a SAGAN checkpoint (no '{FORMAT}' marker): was it written by save_checkpoint?"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}; this code reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it is damaged or was not written by save_checkpoint")
    return state


def check_fits(model: torch.nn.Module, saved: dict, name: str) -> None:
    """Raise CheckpointError naming the first key of the state dict `saved` that `model` lacks, does not have, or
    holds in another shape (torch's own error lists every key over many lines)."""
    own = model.state_dict()
    for key, tensor in saved.items():
        if key not in own:
            raise CheckpointError(
                f"the checkpoint's {name}.{key} has no place in the model: it was written by another "
                "architecture (model.* settings)"
            )
        if own[key].shape != tensor.shape:
            raise CheckpointError(
                f"the checkpoint's {name}.{key} has shape {tuple(tensor.shape)} but the model's has "
                f"{tuple(own[key].shape)}: it was written with other model.* settings"
            )
    missing = [k for k in own if k not in saved]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {name}.{missing[0]} ({len(missing)} key(s) in all): it was written "
            "by another architecture (model.* settings)"
        )


def load_generator(path: str | Path, ema: bool = True, device="cpu") -> tuple[Generator, SaganConfig]:
    """The checkpoint's generator (its EMA weights unless `ema` is False) in eval mode, and its config."""
    return generator_from_state(load_checkpoint(path), ema, device)


def generator_from_state(state: dict, ema: bool = True, device="cpu") -> tuple[Generator, SaganConfig]:
    """The generator in a loaded checkpoint `state` (EMA weights unless `ema` is False), in eval mode on
    `device`, and its config; only G travels to the device, not D or the optimizer states."""
    cfg = saved_config(state["config"])
    G, _ = build_models(cfg.model)
    check_fits(G, state["G_ema" if ema else "G"], "G_ema" if ema else "G")
    G.load_state_dict(state["G_ema" if ema else "G"])
    return G.to(device).eval(), cfg
