"""Images from a trained SAGAN generator: class grids, single images, latent and class interpolations.

    python pipelines/sample.py --checkpoint runs/sagan-demo --classes 3,7 --per-class 8
    python pipelines/sample.py --checkpoint runs/sagan-imagenet128/best --classes 207 --per-class 64 --truncation 0.5 --images
    python pipelines/sample.py --checkpoint models:/sagan-imagenet128/1 --classes all --per-class 4 --tar
    python pipelines/sample.py --checkpoint runs/sagan-demo --interpolate 3,8 --steps 10 --animate gif
    python pipelines/sample.py --checkpoint runs/sagan-demo --export-safetensors G.safetensors

--checkpoint: a checkpoint.pt, a checkpoint_* directory, a run directory (its newest checkpoint), a
.safetensors file written by --export-safetensors, or a registered MLflow model (models:/NAME/VERSION,
see evaluate.py --register; the store is MLFLOW_TRACKING_URI or --tracking-uri).

Image j of every class is drawn from seed --seed + j, so a grid's column shows one latent across the
classes, and the same arguments (batch size and device included) give the same files; another batch size
or device may move a few pixel values by one level (kernels round differently). Written under --out
(default ./samples): grid.png (a row per class, labelled with the names in the shards' classes.tsv, the
first 32 seeds of each; grid-NNN.png per 50 classes for more), with --images images/CLASS_SEED.png, with
--tar samples.tar (WebDataset: KEY.png, KEY.cls). --interpolate A,B walks from (seed, class A) to
(--seed-b, class B) in --steps images (interpolation.png; --animate gif|webp also writes the animation):
A = B walks through latent space within a class, --seed-b = --seed morphs the class alone.
"""

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.cli import check_writable, local_file, pick_device, staged_output
from pipelines.release.sample_files import (
    GRID_COLS,
    MAX_STEPS,
    check_room,
    grid_columns,
    parse_classes,
    progress_bar,
    write_grid,
    write_interpolation,
)
from pipelines.release.sources import load_source
from sagan.errors import UsageError, command, first_line
from sagan.sampling import MIN_TRUNCATION

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.pt, checkpoint_* or run directory, .safetensors file, or models:/NAME/VERSION",
    )
    p.add_argument(
        "--out", default="samples", help="output folder, or s3://BUCKET/PREFIX (uploaded when done; default ./samples)"
    )
    p.add_argument("--classes", help="class indices, e.g. 207,208, or all (default)")
    p.add_argument(
        "--per-class",
        type=int,
        help=f"images per class (default 8; a grid row shows the first {GRID_COLS}, --images and --tar keep all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of each class (default 0)")
    p.add_argument(
        "--truncation",
        type=float,
        default=0.0,
        help=f"truncation trick: redraw |z| > T (T >= {MIN_TRUNCATION}, e.g. 0.5); 0 = off (default)",
    )
    p.add_argument("--raw", action="store_true", help="the trained G instead of its EMA (checkpoints only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available; default)")
    p.add_argument("--images", action="store_true", help="also write every image as images/CLASS_SEED.png")
    p.add_argument("--tar", action="store_true", help="also write every image into samples.tar (WebDataset)")
    p.add_argument(
        "--interpolate", metavar="A,B", help="write an interpolation from class A to class B instead of a grid"
    )
    p.add_argument("--steps", type=int, default=8, help="images in the interpolation (default 8)")
    p.add_argument("--seed-b", type=int, help="seed of the interpolation's end (default --seed + 1)")
    p.add_argument("--animate", choices=("gif", "webp"), help="also write the interpolation as an animation")
    p.add_argument("--class-names", help="classes.tsv to label rows with (default: the one beside the training shards)")
    p.add_argument(
        "--export-safetensors", metavar="FILE", help="write the generator's weights to FILE.safetensors and stop"
    )
    p.add_argument("--tracking-uri", help="MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """What cannot work, before any model is loaded; fills in the grid defaults."""
    local_file(args.export_safetensors, "--export-safetensors", "write it here, then upload it")
    local_file(args.class_names, "--class-names", "download it, or leave it out (the checkpoint's shards name them)")
    if args.interpolate:
        given = (
            ("--classes", args.classes),
            ("--per-class", args.per_class),
            ("--images", args.images or None),
            ("--tar", args.tar or None),
        )
        used = [flag for flag, value in given if value is not None]
        if used:
            raise UsageError(
                f"{used[0]} applies to grids, not to --interpolate: drop it, or sample a grid in another run"
            )
        if len(parse_classes(args.interpolate, flag="--interpolate")) != 2:
            raise UsageError(
                f"--interpolate {args.interpolate!r} must be two class indices, A,B (the same twice for a walk within a class)"
            )
    elif args.animate:
        raise UsageError("--animate animates an interpolation: add --interpolate A,B")
    args.classes = "all" if args.classes is None else args.classes
    args.per_class = 8 if args.per_class is None else args.per_class
    for flag, value, least in (
        ("--per-class", args.per_class, 1),
        ("--batch-size", args.batch_size, 1),
        ("--steps", args.steps, 2),
    ):
        if value < least:
            raise UsageError(f"{flag} {value} is too small: it must be at least {least}")
    if args.steps > MAX_STEPS:
        raise UsageError(
            f"--steps {args.steps} is too many: at most {MAX_STEPS} (the PNG wraps them {GRID_COLS} a row)"
        )
    t = args.truncation
    if not math.isfinite(t) or t < 0 or 0 < t < MIN_TRUNCATION:
        raise UsageError(
            f"--truncation {t} cannot be used: give 0 (off) or a threshold from {MIN_TRUNCATION} up, such as 0.5"
        )
    for flag, seed in (("--seed", args.seed), ("--seed-b", args.seed_b)):
        if seed is not None and not 0 <= seed <= MAX_SEED - args.per_class:
            raise UsageError(f"{flag} {seed} is out of range: use 0 to {MAX_SEED - args.per_class}")
    if args.export_safetensors:
        target = Path(args.export_safetensors)
        if target.suffix != ".safetensors" or target.is_dir():
            raise UsageError(
                f"--export-safetensors {target} must name a file ending in .safetensors (e.g. G.safetensors)"
            )


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    try:
        if args.export_safetensors:
            target = Path(args.export_safetensors).expanduser()
            check_writable(target.parent, "--export-safetensors")
            source = load(args, device)
            written = source.export(target)
            done = f"wrote {written} ({source.description}); load it with sagan.export.load_generator_file(PATH)"
        else:
            done = sample(args, device)
    except OSError as e:  # a file that could not be read (--class-names) or written (--out, --export-safetensors)
        raise UsageError(f"{first_line(e)}: check that path, or choose another --out") from None
    print(done)
    return 0


def sample(args, device) -> str:
    """Write the grid or the interpolation under --out; what was written, as a line to print."""
    with staged_output(args.out, "--out") as (out, name):
        source = load(args, device)
        check_room(args, source, out)
        n_images = 0
        if args.interpolate:
            written = write_interpolation(args, source, out)
        else:
            total = len(parse_classes(args.classes, source.G.num_classes)) * grid_columns(args)[1]
            print(f"sampling {total} images from {source.description} on {device}", flush=True)
            with progress_bar(total) as bar:
                written, n_images = write_grid(args, source, out, bar.update)
        extra = f" and {n_images} image files in {name(out / 'images')}" if n_images else ""
        return "wrote " + ", ".join(name(p) for p in written) + extra


def load(args, device):
    """The generator to sample, on `device`."""
    return load_source(
        args.checkpoint,
        ema=not args.raw,
        device=device,
        names_file=args.class_names,
        tracking_uri=args.tracking_uri,
    )


if __name__ == "__main__":
    sys.exit(main())
