"""Sampling a trained generator: per-image seeds, the truncation trick and interpolations.

Every latent is drawn from its own seed, so an image is fixed by its (class, seed, truncation), not by the
other images of a request: `pipelines/sample.py`, the registered MLflow model and a notebook give the same
picture for the same three values (up to a level of rounding where batch sizes or devices differ).
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# Below this, redrawing |z| > T takes over 60 draws per entry on average (P(|z| < 0.02) = 1.6%): a request
# would stall for minutes at 1e-4, for hours below.
MIN_TRUNCATION = 0.02


def noise(seeds: Sequence[int], z_dim: int, truncation: float = 0.0) -> torch.Tensor:
    """(len(seeds), z_dim) standard normal z, row i from seeds[i] alone. With `truncation` T > 0, every entry
    with |z| > T is redrawn from the same seed's stream until all lie within T (BigGAN, Sec. 3.1)."""
    if not math.isfinite(truncation) or truncation < 0 or 0 < truncation < MIN_TRUNCATION:
        raise ValueError(f"truncation must be 0 (off) or at least {MIN_TRUNCATION}, got {truncation}")
    out = torch.empty(len(seeds), z_dim)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn(z_dim, generator=g)
        if truncation > 0:
            while (outside := z.abs() > truncation).any():
                z[outside] = torch.randn(int(outside.sum()), generator=g)
        out[i] = z
    return out


@torch.no_grad()
def generate(
    G, z: torch.Tensor, y: torch.Tensor, batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    """G(z, y) in batches of `batch_size` on G's device, as float images (N, 3, R, R) in [-1, 1] on the CPU.
    `y` is (N,) class indices or (N, num_classes) class weights; `progress(n)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    device = next(G.parameters()).device
    out = []
    for start in range(0, len(z), batch_size):
        zb, yb = z[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out.append(G(zb, yb).float().cpu())
        if progress:
            progress(len(zb))
    return torch.cat(out) if out else torch.empty(0)


def interpolation_inputs(
    z_a: torch.Tensor, z_b: torch.Tensor, class_a: int, class_b: int, steps: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` inputs walking linearly from (z_a, class_a) to (z_b, class_b), endpoints included and exact.
    Between two classes the labels are class weights (steps, num_classes), (1-t) at class_a and t at class_b,
    which the generator's conditional batch norms mix as a blend of the two classes' gains and biases."""
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps, got {steps}")
    t = torch.linspace(0, 1, steps)[:, None]
    z = (1 - t) * z_a[None] + t * z_b[None]
    if class_a == class_b:
        return z, torch.full((steps,), class_a)
    y = torch.zeros(steps, num_classes)
    y[:, class_a], y[:, class_b] = (1 - t[:, 0]), t[:, 0]
    return z, y


def class_names(tsv: str | Path, num_classes: int) -> list[str] | None:
    """Names of the classes from a shard set's classes.tsv (index, wnid[, name]): the name, else the wnid;
    None when the file is missing or lists another number of classes."""
    path = Path(tsv)
    if not path.is_file():
        return None
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != num_classes:
        return None
    return [(row[2] if len(row) > 2 and row[2] else row[1] if len(row) > 1 else row[0]).strip() for row in rows]
