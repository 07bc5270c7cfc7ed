"""Pictures of a generator: sample grids and attention maps (the SAGAN paper's Figure 5).

Both return RGB images as uint8 numpy arrays (H, W, 3), which PIL saves and MLflow logs as they are.
"""

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .sampling import to_uint8

_QUERY_COLORS = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#ffff33"]


def grid_inputs(z_dim: int, num_classes: int, seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed z (n, z_dim) and labels (n,) cycling through the classes: grids comparable across steps and runs."""
    z = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))
    return z, torch.arange(n) % num_classes


def sample_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> one (H', W', 3) uint8 grid, `nrow` images per row."""
    from torchvision.utils import make_grid  # here: torchvision's import (about 1 s) is needed only for a grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def labelled_grid(images: np.ndarray, ncol: int, labels: list[str] | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> one uint8 grid of `ncol` columns on white, spaced by `pad` pixels as
    `sample_grid` spaces them, with labels[r] written left of row r when given."""
    n, h, w, _ = images.shape
    rows = -(-n // ncol)
    font = ImageFont.load_default(size=max(10, min(h // 3, 16)))
    labels = [text if len(text) <= 28 else text[:25] + "..." for text in labels or []]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(measure.textlength(text, font=font) for text in labels)) + 3 * pad if labels else 0
    canvas = Image.new("RGB", (margin + ncol * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        canvas.paste(Image.fromarray(image), (margin + pad + c * (w + pad), pad + r * (h + pad)))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels):
        draw.text((pad, pad + r * (h + pad) + h // 2), text, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def default_query_points(resolution: int) -> list[tuple[int, int]]:
    """Four (row, col) pixel positions, one per quadrant of a `resolution`-sized image."""
    a, b = resolution // 4, 3 * resolution // 4
    return [(a, a), (a, b), (b, a), (b, b)]


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return out


def attention_figure(image: torch.Tensor, attn: torch.Tensor, query_points: list[tuple[int, int]]) -> np.ndarray:
    """Figure 5 of the paper for one image: the image with its query points, then one panel per point
    showing where that query attends, upsampled to image size.

    image: (3, R, R) in [-1, 1]; attn: (h*w, h*w/4), one attention block's map for this image (a square
    h x w feature map, keys 2x2 max-pooled); query_points: (row, col) pixel positions in the image.
    """
    res = image.shape[-1]
    side = int(round(attn.shape[0] ** 0.5))
    if side * side != attn.shape[0] or attn.shape[1] * 4 != attn.shape[0]:
        raise ValueError(f"attn must be (h*w, h*w/4) for a square map, got {tuple(attn.shape)}")
    rgb = to_uint8(image[None])[0]
    fig, axes = plt.subplots(1, len(query_points) + 1, figsize=(2.2 * (len(query_points) + 1), 2.4))
    axes[0].imshow(rgb)
    axes[0].set_title("queries", fontsize=9)
    for i, (r, c) in enumerate(query_points):
        color = _QUERY_COLORS[i % len(_QUERY_COLORS)]
        q = (r * side // res) * side + (c * side // res)
        heat = attn[q].detach().float().reshape(1, 1, side // 2, side // 2)
        heat = F.interpolate(heat, size=(res, res), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        axes[0].plot(c, r, "o", color=color, markersize=6, markeredgecolor="white")
        ax = axes[i + 1]
        ax.imshow(rgb, alpha=0.5)
        ax.imshow(heat, cmap="inferno", alpha=0.6)
        ax.plot(c, r, "o", color=color, markersize=6, markeredgecolor="white")
        ax.set_title(f"query {i + 1}", fontsize=9, color=color)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return _figure_to_array(fig)


@torch.no_grad()
def attention_figures(G, z: torch.Tensor, y: torch.Tensor, query_points=None) -> dict[int, np.ndarray]:
    """{feature size: figure} for the first sample of G(z, y), one figure per attention block of G."""
    was_training = G.training
    G.eval()
    try:
        images, maps = G(z[:1], y[:1], return_attn=True)
    finally:
        G.train(was_training)
    points = query_points or default_query_points(images.shape[-1])
    return {size: attention_figure(images[0], attn[0], points) for size, attn in maps.items()}


def metric_curve(points: list[tuple[int, float]], name: str) -> np.ndarray:
    """A line plot of (step, value) points as an (H, W, 3) uint8 image, titled `name`."""
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, values, "o-", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # FID falls by orders of magnitude early on
    ax.grid(alpha=0.3)
    ax.set_title(f"{name}: {values[-1]:.3g} at step {steps[-1]}", fontsize=10)
    fig.tight_layout()
    return _figure_to_array(fig)


def heatmap(
    values: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    xlabel: str,
    ylabel: str,
    best_low: bool = True,
) -> np.ndarray:
    """An annotated heatmap of `values` (rows, cols), the best cells brightest (the lowest when `best_low`);
    NaN cells are blank and marked "-". (H, W, 3) uint8."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(col_labels), 1.4 + 0.6 * len(row_labels)))
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap="viridis_r" if best_low else "viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (r, c), v in np.ndenumerate(values):
        text = f"{v:.3g}" if np.isfinite(v) else "-"
        dark = np.isfinite(v) and (v > middle if best_low else v < middle)
        ax.text(c, r, text, ha="center", va="center", color="white" if dark else "black")
    if finite.size:
        fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_to_array(fig)


def metric_curves(series: dict[str, list[tuple[int, float]]], name: str, stopped: set[str] = frozenset()) -> np.ndarray:
    """One line per run of (step, value) points; runs in `stopped` end in an x. (H, W, 3) uint8."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if not points:
            continue
        steps, values = zip(*points)
        (line,) = ax.plot(steps, values, "o-", markersize=3, label=label)
        if label in stopped:
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=10, markeredgewidth=2)
    finite = [v for points in series.values() for _, v in points if np.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{name} per trial (x: stopped early)", fontsize=10)
    fig.tight_layout()
    return _figure_to_array(fig)
