"""A generator's samples written to files: class grids (a row per class, GRID_ROWS classes a file), every image
as PNG files or a WebDataset tar, and interpolations (a strip, optionally animated). `args` are sample.py's
parsed flags."""

import re
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.release.image_files import save_animation, save_image, webdataset_writer
from sagan.errors import UsageError
from sagan.sampling import generate, interpolation_inputs, noise, to_uint8
from sagan.viz import labelled_grid

GRID_ROWS = 50  # classes per grid file: 1,000 ImageNet rows would make one unreadable 130,000-pixel picture
GRID_COLS = 32  # seeds per grid row; --images and --tar hold them all
CHUNK = 1024  # images generated and written at a time: memory stays bounded for any request
MAX_STEPS = 1024  # interpolation frames: all are held in memory, and the PNG wraps them GRID_COLS to a row
FILE_OVERHEAD = 2048  # bytes an image file may add to its pixels: PNG chunks, a tar member's headers


def parse_classes(text: str, num_classes: int | None = None, flag: str = "--classes") -> list[int]:
    """`all` or comma-separated indices; with `num_classes`, each checked against the generator's classes."""
    if text.strip() == "all" and flag == "--classes":
        return list(range(num_classes or 0))
    parts = [c.strip() for c in text.split(",")]
    if not all(re.fullmatch(r"-?\d+", c) for c in parts):
        raise UsageError(
            f"{flag} {text!r} is not a comma-separated list of class indices (e.g. 207,208)"
            + (" or all" if flag == "--classes" else "")
        )
    classes = [int(c) for c in parts]
    twice = [c for c in set(classes) if classes.count(c) > 1]
    if twice and flag == "--classes":
        raise UsageError(f"--classes lists class {twice[0]} twice; list each class once")
    bad = [c for c in classes if num_classes is not None and not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"class {bad[0]} is out of range: this generator has {num_classes} classes (0..{num_classes - 1})"
        )
    return classes


def write_grid(args, source, out: Path, progress) -> tuple[list[Path], int]:
    """Grid files of GRID_ROWS classes x GRID_COLS seeds each and, with --images / --tar, every image; generated
    CHUNK images at a time (only the grid's seeds when nothing else wants the rest). Returns (grid and tar paths,
    number of image files)."""
    G = source.G
    classes = parse_classes(args.classes, G.num_classes)
    groups = [classes[i : i + GRID_ROWS] for i in range(0, len(classes), GRID_ROWS)]
    cols, per = grid_columns(args)
    z_cols = noise(range(args.seed, args.seed + per), G.z_dim, args.truncation)  # once: 512 bytes a seed
    written, n_images = [], 0
    with ExitStack() as stack:
        tar = stack.enter_context(webdataset_writer(out / "samples.tar")) if args.tar else None
        for n, group in enumerate(groups):
            shown = []
            for start in range(0, len(group) * per, CHUNK):
                index = torch.arange(start, min(start + CHUNK, len(group) * per))
                seeds, y = (args.seed + index % per).tolist(), torch.tensor(group)[index // per]
                images = generate_uint8(G, z_cols[index % per], y, args.batch_size, progress)
                for seed, cls, image in zip(seeds, y.tolist(), images):
                    key = f"{cls:04d}_{seed:06d}"
                    shown += [image] if seed - args.seed < cols else []
                    if args.images:
                        save_image(image, out / "images" / f"{key}.png")
                        n_images += 1
                    if tar:
                        tar(key, image, cls)
            name = "grid.png" if len(groups) == 1 else f"grid-{n:03d}.png"
            written.append(
                save_image(labelled_grid(np.stack(shown), cols, [label(source, c) for c in group]), out / name)
            )
    return written + ([out / "samples.tar"] if args.tar else []), n_images


def grid_columns(args) -> tuple[int, int]:
    """(seeds per grid row, seeds generated per class): all of them only when --images or --tar keeps them."""
    cols = min(args.per_class, GRID_COLS)
    return cols, args.per_class if args.images or args.tar else cols


def generate_uint8(G, z, y, batch_size: int, progress=None):
    """G's images as (N, R, R, 3) uint8."""
    return to_uint8(generate(G, z, y, batch_size, progress))


def label(source, c: int) -> str:
    return f"{c} {source.names[c]}" if source.names else str(c)


def write_interpolation(args, source, out: Path) -> list[Path]:
    G = source.G
    a, b = parse_classes(args.interpolate, G.num_classes, flag="--interpolate")
    seed_b = args.seed + 1 if args.seed_b is None else args.seed_b
    z_ends = noise([args.seed, seed_b], G.z_dim, args.truncation)
    z, y = interpolation_inputs(z_ends[0], z_ends[1], a, b, args.steps, G.num_classes)
    with progress_bar(args.steps) as bar:
        frames = generate_uint8(G, z, y, args.batch_size, bar.update)
    title = (
        f"{label(source, a)} -> {label(source, b)}" if a != b else f"{label(source, a)}: seed {args.seed} -> {seed_b}"
    )
    written = [save_image(labelled_grid(frames, min(args.steps, GRID_COLS), [title]), out / "interpolation.png")]
    if args.animate:
        written.append(save_animation(frames, out / f"interpolation.{args.animate}"))
    return written


def progress_bar(total: int):
    """A tqdm bar on stderr for requests of a few batches or more, else a silent stand-in."""
    return tqdm(total=total, unit="img", disable=total < 256, file=sys.stderr)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux /proc/meminfo), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_room(args, source, out: Path) -> None:
    """Refuse, before generating, a request whose images cannot fit in memory or on disk (upper estimates)."""
    R, z_dim = source.kwargs.get("resolution", 128), source.kwargs.get("z_dim", 128)  # Generator's defaults
    image = R * R * 3
    if args.interpolate:
        n, memory = args.steps, args.steps * image * 5  # the frames, and their float pixels while converted
        disk = n * (image + FILE_OVERHEAD) * (2 if args.animate else 1)
        ask = "fewer --steps"
    else:
        classes = len(parse_classes(args.classes, source.G.num_classes))
        cols, per = grid_columns(args)
        n = classes * per
        memory = per * z_dim * 4 + GRID_ROWS * cols * image + CHUNK * image * 5
        disk = n * (image + FILE_OVERHEAD) * (int(args.images) + int(args.tar)) + classes * cols * image  # + grids
        ask = "fewer images (--per-class, --classes)"
    free_memory = available_memory()
    if free_memory is not None and memory > free_memory:
        raise UsageError(
            f"this request holds about {_gb(memory)} in memory ({n} images at {R}px) but {_gb(free_memory)} is "
            f"available; ask for {ask}"
        )
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free_disk = shutil.disk_usage(folder).free
    if disk > free_disk:
        raise UsageError(
            f"this request writes up to {_gb(disk)} ({n} images at {R}px) but {folder} has {_gb(free_disk)} free; "
            f"ask for {ask}, or choose another --out"
        )
