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
classes and the same arguments give the same images (on the CPU bit for bit; on a GPU to within its
kernels' rounding). Written under --out (default ./samples): grid.png (a row per class, labelled with the
names in the shards' classes.tsv; grid-NNN.png per 50 classes for more), with --images images/CLASS_SEED.png,
with --tar samples.tar (WebDataset: key, png, cls). --interpolate A,B walks from (seed, class A) to
(--seed-b, class B) in --steps images (interpolation.png; --animate gif|webp also writes the animation):
A = B walks through latent space within a class, --seed-b = --seed morphs the class alone.
"""

import argparse
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from pipelines.common import UsageError, check_writable, first_line, pick_device  # noqa: E402
from pipelines.generators import load_source  # noqa: E402
from sagan.checkpoint import CheckpointError  # noqa: E402
from sagan.files import atomic_output  # noqa: E402

GRID_ROWS = 50  # classes per grid file: 1,000 ImageNet rows would make one unreadable 130,000-pixel picture


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt, checkpoint_* or run directory, .safetensors file, or models:/NAME/VERSION")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--classes", default="all", help="class indices, e.g. 207,208, or all (default)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of each class (default 0)")
    p.add_argument("--truncation", type=float, default=0.0, help="truncation trick: redraw |z| > T (e.g. 0.5); 0 = off (default)")
    p.add_argument("--raw", action="store_true", help="the trained G instead of its EMA (checkpoints only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available; default)")
    p.add_argument("--images", action="store_true", help="also write every image as images/CLASS_SEED.png")
    p.add_argument("--tar", action="store_true", help="also write every image into samples.tar (WebDataset)")
    p.add_argument("--interpolate", metavar="A,B", help="write an interpolation from class A to class B instead of a grid")
    p.add_argument("--steps", type=int, default=8, help="images in the interpolation (default 8)")
    p.add_argument("--seed-b", type=int, help="seed of the interpolation's end (default --seed + 1)")
    p.add_argument("--animate", choices=("gif", "webp"), help="also write the interpolation as an animation")
    p.add_argument("--class-names", help="classes.tsv to label rows with (default: the one beside the training shards)")
    p.add_argument("--export-safetensors", metavar="FILE", help="write the generator's weights to FILE (safetensors) and stop")
    p.add_argument("--tracking-uri", help="MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """`all` or comma-separated indices, each checked against the generator's classes."""
    if text.strip() == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes {text!r} is not a comma-separated list of class indices (e.g. 207,208) or all") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise UsageError(f"class {bad[0] if bad else text!r} is out of range: this generator has {num_classes} classes (0..{num_classes - 1})")
    return classes


def check_args(args) -> None:
    """Numbers that cannot work, before any model is loaded."""
    for flag, value, least in (("--per-class", args.per_class, 1), ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 2)):
        if value < least:
            raise UsageError(f"{flag} {value} is too small: it must be at least {least}")
    if args.truncation < 0:
        raise UsageError(f"--truncation {args.truncation} is negative: use a positive threshold such as 0.5, or 0 for none")
    if args.animate and not args.interpolate:
        raise UsageError("--animate animates an interpolation: add --interpolate A,B")


def write_grid(args, source, out: Path, progress) -> list[Path]:
    """Grid files of GRID_ROWS classes each, generated a file at a time (memory stays bounded on 1,000 classes),
    and with --images / --tar every image."""
    from sagan.sampling import class_grid_inputs
    from sagan.viz import labelled_grid

    G = source.G
    classes = parse_classes(args.classes, G.num_classes)
    groups = [classes[i : i + GRID_ROWS] for i in range(0, len(classes), GRID_ROWS)]
    written = []
    with ExitStack() as stack:
        tar = stack.enter_context(webdataset_writer(out / "samples.tar")) if args.tar else None
        for n, group in enumerate(groups):
            z, y = class_grid_inputs(group, args.per_class, args.seed, G.z_dim, args.truncation)
            images = generate_uint8(G, z, y, args.batch_size, progress)
            labels = [label(source, c) for c in group]
            name = "grid.png" if len(groups) == 1 else f"grid-{n:03d}.png"
            written.append(save_image(labelled_grid(images, args.per_class, labels), out / name))
            keys = [f"{c:04d}_{args.seed + j:06d}" for c in group for j in range(args.per_class)]
            if args.images:
                written += [save_image(img, out / "images" / f"{key}.png") for key, img in zip(keys, images)]
            for key, image, cls in zip(keys, images, y.tolist()) if tar else ():
                tar(key, image, cls)
    return written + ([out / "samples.tar"] if args.tar else [])


def generate_uint8(G, z, y, batch_size: int, progress=None, chunk: int = 1024):
    """G's images as (N, R, R, 3) uint8, converted `chunk` images at a time so float copies stay small."""
    import numpy as np

    from sagan.sampling import generate, to_uint8

    return np.concatenate([to_uint8(generate(G, z[i : i + chunk], y[i : i + chunk], batch_size, progress))
                           for i in range(0, len(z), chunk)])  # fmt: skip


def label(source, c: int) -> str:
    return f"{c} {source.names[c]}" if source.names else str(c)


def write_interpolation(args, source, out: Path) -> list[Path]:
    from sagan.sampling import interpolation_inputs, noise
    from sagan.viz import labelled_grid

    G = source.G
    a, b = parse_classes(args.interpolate, G.num_classes) if args.interpolate.count(",") == 1 else (None, None)
    if a is None:
        raise UsageError(f"--interpolate {args.interpolate!r} must be two class indices, A,B (the same twice for a walk within a class)")
    seed_b = args.seed + 1 if args.seed_b is None else args.seed_b
    z_ends = noise([args.seed, seed_b], G.z_dim, args.truncation)
    z, y = interpolation_inputs(z_ends[0], z_ends[1], a, b, args.steps, G.num_classes)
    frames = generate_uint8(G, z, y, args.batch_size)
    title = f"{label(source, a)} -> {label(source, b)}" if a != b else f"{label(source, a)}: seed {args.seed} -> {seed_b}"
    written = [save_image(labelled_grid(frames, args.steps, [title]), out / "interpolation.png")]
    if args.animate:
        written.append(save_animation(frames, out / f"interpolation.{args.animate}"))
    return written


def save_image(image, path: Path) -> Path:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def save_animation(frames, path: Path, ms_per_frame: int = 120) -> Path:
    """The frames there and back again, looping (GIF or WebP by the suffix)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in [*frames, *frames[-2:0:-1]]]
    with atomic_output(path) as tmp:
        images[0].save(tmp, format=path.suffix[1:].upper(), save_all=True, append_images=images[1:],
                       duration=ms_per_frame, loop=0)  # fmt: skip
    return path


@contextmanager
def webdataset_writer(path: Path):
    """A function (key, image, class) that adds KEY.png and KEY.cls to the tar at `path`, as the training shards
    hold them; the tar appears under its name when the block ends without an error."""
    import io

    import webdataset as wds
    from PIL import Image

    def write(key, image, cls):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        sink.write({"__key__": key, "png": png.getvalue(), "cls": str(cls).encode()})

    with atomic_output(path) as tmp, wds.TarWriter(str(tmp)) as sink:
        yield write


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        out = Path(args.out).expanduser()
        target = Path(args.export_safetensors).expanduser() if args.export_safetensors else out
        check_writable(target.parent if args.export_safetensors else target, "--export-safetensors" if args.export_safetensors else "--out")
        device = pick_device(args.device)
        source = load_source(args.checkpoint, ema=not args.raw, device=device, names_file=args.class_names,
                             tracking_uri=args.tracking_uri)  # fmt: skip
        if args.export_safetensors:
            print(f"wrote {source.export(target)} ({source.description}); load it with "
                  "sagan.export.load_generator_file(PATH)")  # fmt: skip
            return 0
        if args.interpolate:
            written = write_interpolation(args, source, out)
        else:
            total = len(parse_classes(args.classes, source.G.num_classes)) * args.per_class
            print(f"sampling {total} images from {source.description} on {device}", flush=True)
            with progress_bar(total) as bar:
                written = write_grid(args, source, out, bar.update)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the output: {first_line(e)}; choose another --out", file=sys.stderr)
        return 2
    shown = [p for p in written if p.parent == out]
    extra = len(written) - len(shown)
    print("wrote " + ", ".join(str(p) for p in shown) + (f" and {extra} image files in {out / 'images'}" if extra else ""))
    return 0


def progress_bar(total: int):
    """A tqdm bar on stderr for requests of a few batches or more, else a silent stand-in."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=total < 256, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
