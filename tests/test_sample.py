"""pipelines/sample.py, sagan.sampling and sagan.export: grids, seeds, truncation, interpolation, safetensors,
and the one-line errors (the registered MLflow model: test_registry.py)."""

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipelines.sample import main
from sagan.checkpoint import load_generator, save_checkpoint
from sagan.export import load_generator_file
from sagan.models import Generator
from sagan.sampling import generate, interpolation_inputs, noise, to_uint8
from tests.test_step import real_batch, tiny_trainer

R, PAD = 32, 2  # the tiny generator's image size; the grid's padding


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny trained checkpoint (4 classes, z_dim 16, 32px) whose EMA differs from its raw G."""
    trainer, cfg = tiny_trainer("train.ema_decay=0.5")
    torch.manual_seed(0)
    for _ in range(2):
        trainer.train_step([real_batch()])
    return save_checkpoint(tmp_path / "run" / "checkpoint_000001" / "checkpoint.pt", trainer, cfg)


def images_in(folder) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def direct(G, classes, seeds, truncation=0.0) -> np.ndarray:
    """The generator's images for these classes and seeds, without sample.py."""
    return to_uint8(generate(G, noise(seeds, G.z_dim, truncation), torch.tensor(classes)))


def test_grid_has_a_row_per_class_in_the_order_asked_and_each_image_is_its_seeds(checkpoint, tmp_path):
    out = tmp_path / "s"
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint.parent.parent),
                "--out",
                str(out),
                "--classes",
                "2,0",
                "--per-class",
                "3",
                "--seed",
                "7",
                "--images",
                "--tar",
            ]
        )
        == 0
    )
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] == 2 * (R + PAD) + PAD and grid.shape[2] == 3
    margin = grid.shape[1] - (3 * (R + PAD) + PAD)
    assert margin > 0  # the row labels
    files = images_in(out / "images")
    assert list(files) == ["0000_000007", "0000_000008", "0000_000009", "0002_000007", "0002_000008", "0002_000009"]
    G, _ = load_generator(checkpoint)
    expected = direct(G, [2, 2, 2, 0, 0, 0], [7, 8, 9] * 2)
    for k, (row, col) in enumerate([(r, c) for r in range(2) for c in range(3)]):
        y0, x0 = PAD + row * (R + PAD), margin + PAD + col * (R + PAD)
        np.testing.assert_array_equal(grid[y0 : y0 + R, x0 : x0 + R], expected[k])  # row 0 is class 2
    np.testing.assert_array_equal(files["0002_000008"], expected[1])
    with tarfile.open(out / "samples.tar") as tar:
        names = sorted(m.name for m in tar.getmembers())
        assert names[:2] == ["0000_000007.cls", "0000_000007.png"] and len(names) == 12
        assert tar.extractfile("0002_000009.cls").read() == b"2"
    assert not list(out.rglob(".*tmp*"))  # written under temporary names, then renamed
    umask = os.umask(0)
    os.umask(umask)
    assert {(out / f).stat().st_mode & 0o777 for f in ("grid.png", "samples.tar", "images/0000_000007.png")} == {
        0o666 & ~umask
    }


def test_many_classes_go_into_one_grid_file_per_group_and_one_tar(checkpoint, tmp_path, monkeypatch):
    import pipelines.release.sample_files as sample

    monkeypatch.setattr(sample, "GRID_ROWS", 3)  # 4 classes: a file of 3 rows and one of 1
    monkeypatch.setattr(sample, "GRID_COLS", 1)  # the first seed of each class in the grid; the tar has both
    monkeypatch.setattr(sample, "CHUNK", 4)  # generated 4 images at a time, across class boundaries
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--per-class", "2", "--tar"]) == 0
    shapes = [np.asarray(Image.open(tmp_path / f"grid-00{n}.png")).shape[:2] for n in (0, 1)]
    assert [h for h, _ in shapes] == [3 * (R + PAD) + PAD, R + 2 * PAD] and not (tmp_path / "grid.png").exists()
    assert all(w < 2 * (R + PAD) + PAD for _, w in shapes)  # one image column (and a narrow label margin)
    with tarfile.open(tmp_path / "samples.tar") as tar:
        assert [m.name for m in tar.getmembers() if m.name.endswith(".cls")] == [
            f"{c:04d}_{j:06d}.cls" for c in range(4) for j in (0, 1)
        ]


def test_the_same_seed_gives_the_same_images_and_another_seed_others(checkpoint, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert (
            main(
                [
                    "--checkpoint",
                    str(checkpoint),
                    "--out",
                    str(tmp_path / name),
                    "--classes",
                    "1",
                    "--per-class",
                    "2",
                    "--seed",
                    str(seed),
                    "--images",
                    "--batch-size",
                    "1",
                ]
            )
            == 0
        )
        runs[name] = images_in(tmp_path / name / "images")
    assert all(np.array_equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    # seed 4 is the second image of the seed-3 request: images depend on their own seed, not their neighbours
    np.testing.assert_array_equal(runs["c"]["0001_000004"], runs["a"]["0001_000004"])
    assert not np.array_equal(runs["c"]["0001_000005"], runs["a"]["0001_000003"])


def test_truncation_bounds_z_and_keeps_the_entries_already_inside():
    free, cut = noise(range(20), 128), noise(range(20), 128, truncation=0.5)
    assert free.abs().max() > 2 and cut.abs().max() <= 0.5
    inside = free.abs() <= 0.5
    assert torch.equal(cut[inside], free[inside]) and (cut[~inside] != free[~inside]).all()
    for bad in (-1, 1e-4, float("nan"), float("inf")):  # 1e-4 would take minutes of redrawing per seed
        with pytest.raises(ValueError, match="truncation must be 0"):
            noise([0], 8, bad)


def test_raw_and_ema_generators_differ_and_truncation_changes_the_images(checkpoint, tmp_path):
    outs = {}
    for name, extra in (("ema", []), ("raw", ["--raw"]), ("trunc", ["--truncation", "0.3"])):
        assert (
            main(
                [
                    "--checkpoint",
                    str(checkpoint),
                    "--out",
                    str(tmp_path / name),
                    "--classes",
                    "0",
                    "--per-class",
                    "1",
                    "--images",
                    *extra,
                ]
            )
            == 0
        )
        outs[name] = images_in(tmp_path / name / "images")["0000_000000"]
    G, _ = load_generator(checkpoint, ema=False)
    np.testing.assert_array_equal(outs["raw"], direct(G, [0], [0])[0])
    assert not np.array_equal(outs["ema"], outs["raw"]) and not np.array_equal(outs["ema"], outs["trunc"])


def test_interpolation_endpoints_equal_the_direct_samples_within_and_between_classes(checkpoint, tmp_path):
    G, _ = load_generator(checkpoint)
    z_ends = noise([5, 9], G.z_dim)
    for a, b in ((1, 1), (1, 3)):
        z, y = interpolation_inputs(z_ends[0], z_ends[1], a, b, 6, G.num_classes)
        frames = generate(G, z, y)
        assert frames.shape == (6, 3, R, R)
        torch.testing.assert_close(frames[0], generate(G, z_ends[:1], torch.tensor([a]))[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(frames[-1], generate(G, z_ends[1:], torch.tensor([b]))[0], atol=1e-5, rtol=0)
        assert (frames[1:] - frames[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0  # every step moves
    out = tmp_path / "i"
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--interpolate",
                "1,3",
                "--steps",
                "6",
                "--seed",
                "5",
                "--seed-b",
                "9",
                "--animate",
                "gif",
            ]
        )
        == 0
    )
    strip = np.asarray(Image.open(out / "interpolation.png"))
    assert strip.shape[0] == R + 2 * PAD and not (out / "grid.png").exists()
    with Image.open(out / "interpolation.gif") as gif:
        assert gif.n_frames == 6 + 4  # there and back: 6 frames out, 4 inner frames back
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--interpolate",
                "2,2",
                "--steps",
                "3",
                "--animate",
                "webp",
            ]
        )
        == 0
    )
    with Image.open(out / "interpolation.webp") as webp:
        assert webp.n_frames == 3 + 1 and webp.size == (R, R)


def test_safetensors_export_round_trip_is_bit_exact_and_samples_the_same(checkpoint, tmp_path, capsys):
    path = tmp_path / "G.safetensors"
    assert main(["--checkpoint", str(checkpoint), "--export-safetensors", str(path)]) == 0
    G, _ = load_generator(checkpoint)
    loaded, meta = load_generator_file(path)
    assert meta["step"] == 2 and meta["weights"] == "ema"
    # The documented plain route: no sagan config or checkpoint code.
    plain = Generator(**json.loads(safe_open(str(path), "pt").metadata()["generator"]))
    plain.load_state_dict(load_file(str(path)))
    plain.eval()
    for other in (loaded, plain):
        own, theirs = G.state_dict(), other.state_dict()
        assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
        np.testing.assert_array_equal(direct(other, [0, 3], [1, 2]), direct(G, [0, 3], [1, 2]))
    for name, spec in (("ckpt", checkpoint), ("st", path)):
        assert main(["--checkpoint", str(spec), "--out", str(tmp_path / name), "--per-class", "2", "--images"]) == 0
    a, b = images_in(tmp_path / "ckpt" / "images"), images_in(tmp_path / "st" / "images")
    assert list(a) == list(b) and len(a) == 8 and all(np.array_equal(a[k], b[k]) for k in a)


def foreign_torch_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    return str(tmp_path / "other.pt")


def foreign_safetensors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    return str(tmp_path / "other.safetensors")


def tampered_safetensors(checkpoint, tmp_path, key, value):
    """The checkpoint exported to safetensors, with one metadata entry changed (generator.KEY, or KEY)."""
    path = tmp_path / "tampered.safetensors"
    assert main(["--checkpoint", checkpoint, "--export-safetensors", str(path)]) == 0
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    if key in ("ch", "num_classes", "z_dim"):
        header["generator"] = json.dumps({**json.loads(header["generator"]), key: value})
    else:
        header[key] = json.dumps(value)
    save_file(load_file(str(path)), str(path), metadata=header)
    return str(path)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda c, t: ["--checkpoint", c, "--interpolate", "0,1", "--steps", "5000"], "--steps 5000 is too many"),
        (lambda c, t: ["--checkpoint", c, "--per-class", "2000000000", "--images"], "GB in memory (8000000000 images"),
        (
            lambda c, t: ["--checkpoint", tampered_safetensors(c, t, "ch", 10**9)],
            "has damaged SAGAN metadata (ch 1000000000, z_dim",
        ),
        (lambda c, t: ["--checkpoint", tampered_safetensors(c, t, "ch", 0)], "has damaged SAGAN metadata (model.ch"),
        (
            lambda c, t: ["--checkpoint", tampered_safetensors(c, t, "class_names", [1, 2])],
            "class_names is not a list of 4 names",
        ),
        (
            lambda c, t: ["--checkpoint", c, "--classes", "4"],
            "class 4 is out of range: this generator has 4 classes (0..3)",
        ),
        (lambda c, t: ["--checkpoint", c, "--classes", "cat"], "is not a comma-separated list of class indices"),
        (lambda c, t: ["--checkpoint", c, "--interpolate", "1,-1"], "class -1 is out of range"),
        (lambda c, t: ["--checkpoint", c, "--interpolate", "1"], "must be two class indices"),
        (lambda c, t: ["--checkpoint", c, "--steps", "1", "--interpolate", "0,1"], "--steps 1 is too small"),
        (lambda c, t: ["--checkpoint", c, "--truncation", "-0.5"], "--truncation -0.5 cannot be used"),
        (lambda c, t: ["--checkpoint", c, "--truncation", "1e-4"], "--truncation 0.0001 cannot be used"),
        (lambda c, t: ["--checkpoint", c, "--classes", "1,1"], "--classes lists class 1 twice"),
        (lambda c, t: ["--checkpoint", c, "--per-class", "0"], "--per-class 0 is too small"),
        (lambda c, t: ["--checkpoint", c, "--interpolate", "0,1", "--per-class", "0"], "--per-class applies to grids"),
        (lambda c, t: ["--checkpoint", c, "--interpolate", "1,"], "is not a comma-separated list of class indices"),
        (lambda c, t: ["--checkpoint", c, "--interpolate", "0,1", "--images"], "--images applies to grids"),
        (lambda c, t: ["--checkpoint", c, "--seed", "-1"], "--seed -1 is out of range"),
        (
            lambda c, t: ["--checkpoint", c, "--export-safetensors", str(t / "G.bin")],
            "must name a file ending in .safetensors",
        ),
        (lambda c, t: ["--checkpoint", foreign_torch_file(t)], "is not a SAGAN checkpoint"),
        (lambda c, t: ["--checkpoint", foreign_safetensors(t)], "is a safetensors file but not a SAGAN generator"),
        (lambda c, t: ["--checkpoint", str(t / "nowhere")], "no checkpoint at"),
        (lambda c, t: ["--checkpoint", c, "--out", c], "--out"),  # a file where the folder should be
        (
            lambda c, t: ["--checkpoint", "models:/missing/1", "--tracking-uri", f"sqlite:///{t / 'm.db'}"],
            "m.db does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_image(checkpoint, tmp_path, capsys, monkeypatch, make_args, message):
    monkeypatch.chdir(tmp_path)
    assert main(make_args(str(checkpoint), tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").iterdir())


def test_a_request_larger_than_the_free_disk_is_refused_before_any_image(checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    import pipelines.release.sample_files as sample_files

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sample_files.shutil, "disk_usage", lambda p: usage._replace(free=1_000_000))  # 1 MB left
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--per-class", "100", "--images", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "this request writes up to" in err and "has 0.001 GB free" in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not list(out.iterdir())
