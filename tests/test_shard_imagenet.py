import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from preprocessing.make_sample_data import write_sample_data
from preprocessing.shard_imagenet import main
from preprocessing.shards import sha256_file, to_rgb
from tests.fake_imagenet import WNIDS, make_tree

REPO = Path(__file__).resolve().parent.parent


def shard(src, out, *extra):
    return main(
        ["--src", str(src), "--out", str(out), "--shard-size", "4", "--workers", "1", "--max-failures", "3", *extra]
    )


def read_split(out: Path, split: str) -> list[dict]:
    urls = sorted(str(p) for p in (out / split).glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


@pytest.mark.parametrize("layout", ["folders", "kaggle"])
def test_shards_read_back_with_labels_sizes_and_failures(tmp_path, layout):
    expected = make_tree(tmp_path / "src", layout)
    out = tmp_path / "out"
    assert shard(tmp_path / "src", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["layout"] == layout and manifest["complete"]
    for split in ("train", "val"):
        samples = read_split(out, split)
        assert len(samples) == expected[split] == manifest["splits"][split]["num_samples"]
        assert len({s["__key__"] for s in samples}) == len(samples)
        for s in samples:
            assert s["jpg"].mode == "RGB" and s["jpg"].size == (128, 128)
            assert int(s["cls"]) == WNIDS.index(s["json"]["wnid"])
        counts = {str(k): sum(int(s["cls"]) == k for s in samples) for k in range(3)}
        assert manifest["splits"][split]["class_counts"] == counts
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["path"] for f in failures) == sorted(expected["bad"])
    assert all(f["reason"] for f in failures)
    classes = (out / "classes.tsv").read_text().splitlines()
    assert classes[0] == f"0\t{WNIDS[0]}\tclass {WNIDS[0]}"


def test_manifest_records_hashes_counts_and_pattern(folder_out):
    manifest = json.loads((folder_out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["pattern"] == f"imagenet128-train-{{000000..{len(train['shards']) - 1:06d}}}.tar"
    for rec in train["shards"]:
        path = folder_out / "train" / rec["name"]
        assert sha256_file(path) == rec["sha256"] and path.stat().st_size == rec["bytes"]
    sizes = [r["planned"] for r in train["shards"]]
    assert max(sizes) - min(sizes) <= 1
    assert manifest["options"]["size"] == 128 and manifest["options"]["resize_filter"] == "bicubic"
    assert "pillow" in manifest["versions"]


def test_oddities_become_8bit_rgb(folder_out):
    by_key = {s["__key__"]: s for s in read_split(folder_out, "train")}
    odd = {name: by_key[f"{WNIDS[0]}_{name}"] for name in ("png", "cmyk", "gray", "palette", "16bit", "wide", "tiny")}
    assert odd["cmyk"]["json"]["source_mode"] == "CMYK"
    assert odd["16bit"]["json"]["source_mode"].startswith("I")
    assert odd["wide"]["json"]["source_size"] == [1200, 60] and odd["tiny"]["json"]["source_size"] == [10, 7]
    gray = np.asarray(odd["gray"]["jpg"]).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 3  # stays grey


def test_16bit_grey_is_scaled_not_clipped():
    deep = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert np.asarray(to_rgb(deep))[0, 0].tolist() == [128, 128, 128]


def test_samples_are_mixed_across_shards(folder_out):
    manifest = json.loads((folder_out / "manifest.json").read_text())
    mixed = [len(r["class_counts"]) > 1 for r in manifest["splits"]["train"]["shards"]]
    assert sum(mixed) >= len(mixed) // 2


def test_two_runs_are_byte_identical(folder_tree, folder_out, tmp_path):
    out = tmp_path / "again"
    assert shard(folder_tree[0], out, "--workers", "2") == 0
    assert tar_bytes(out) == tar_bytes(folder_out)


def test_deleting_a_shard_rebuilds_exactly_that_shard(folder_tree, tmp_path):
    out = tmp_path / "out"
    assert shard(folder_tree[0], out) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/*.tar")}
    victim = sorted(before)[2]
    victim.unlink()
    assert shard(folder_tree[0], out) == 0
    for path, (mtime, data) in before.items():
        assert path.read_bytes() == data
        assert (path.stat().st_mtime_ns == mtime) == (path != victim)


def test_killed_run_leaves_no_partial_shard_and_rerun_completes(folder_tree, folder_out, tmp_path):
    out = tmp_path / "out"
    # SIGKILL the process on the 10th image, in the middle of the third shard of 4.
    killer = (
        "import os, signal, preprocessing.shards as s\n"
        "orig, n = s.load_square, [0]\n"
        "def load(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 10: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(*a, **k)\n"
        "s.load_square = load\n"
        "from preprocessing.shard_imagenet import main\n"
        f"main(['--src', {str(folder_tree[0])!r}, '--out', {str(out)!r}, '--shard-size', '4', '--workers', '1', '--max-failures', '3'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", killer], cwd=REPO, capture_output=True)
    assert proc.returncode == -9
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    done = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert done == ["imagenet128-train-000000.tar", "imagenet128-train-000001.tar"]
    assert list((out / "train").glob(".*.tmp-*"))  # the partial shard only ever had a temporary name
    assert shard(folder_tree[0], out) == 0
    assert tar_bytes(out) == tar_bytes(folder_out)
    assert not list((out / "train").glob(".*.tmp-*"))


def test_too_many_failures_fail_the_run(folder_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--src", str(folder_tree[0]), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"^error: 3 unreadable image\(s\), more than --max-failures 0", err), err
    assert len((out / "failures.jsonl").read_text().splitlines()) == 3


def test_limit_takes_n_per_split(folder_tree, tmp_path):
    assert shard(folder_tree[0], tmp_path / "o", "--limit", "5") == 0
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert manifest["splits"]["val"]["num_samples"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--src", "/nonexistent"], "is not a directory"),
        (["--src", "{empty}"], "neither train/ or val/ folders"),
        (["--src", "{tree}", "--splits", "test"], "split(s) ['test'] not found"),
        (["--src", "{tree}", "--quality", "0"], "--quality must be in 1..100"),
        (["--src", "{tree}", "--size", "0"], "--size must be at least 1"),
        ([], "--src is required"),
    ],
)
def test_bad_input_is_one_line_error(args, message, folder_tree, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(tree=folder_tree[0], empty=tmp_path / "empty") for a in args]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_val_class_unknown_to_train_is_an_error(tmp_path, capsys):
    make_tree(tmp_path / "src")
    (tmp_path / "src/val/n09999999").mkdir()
    Image.new("RGB", (50, 50)).save(tmp_path / "src/val/n09999999/x.JPEG")
    assert shard(tmp_path / "src", tmp_path / "o") == 2
    assert "not among the train folders: ['n09999999']" in capsys.readouterr().err


def test_changed_options_need_overwrite(folder_tree, tmp_path, capsys):
    out = tmp_path / "o"
    assert shard(folder_tree[0], out, "--limit", "4") == 0
    assert shard(folder_tree[0], out, "--limit", "4", "--quality", "80") == 2
    assert "quality: 95 -> 80" in capsys.readouterr().err
    assert shard(folder_tree[0], out, "--limit", "4", "--quality", "80", "--overwrite") == 0


def test_verify_detects_a_corrupted_shard(folder_tree, tmp_path):
    out = tmp_path / "o"
    assert shard(folder_tree[0], out) == 0
    assert main(["--out", str(out), "--verify"]) == 0
    victim = sorted((out / "train").glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["--out", str(out), "--verify"]) == 1


def test_ray_backend_writes_identical_shards(ray_session, folder_tree, folder_out, tmp_path):
    out = tmp_path / "ray"
    assert shard(folder_tree[0], out, "--backend", "ray") == 0
    assert tar_bytes(out) == tar_bytes(folder_out)


def test_sample_data_goes_through_the_same_sharding(tmp_path):
    counts = write_sample_data(tmp_path / "raw")
    assert counts == {"train": 1438, "val": 359}
    assert (
        main(["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "s"), "--size", "32", "--shard-size", "200"]) == 0
    )
    samples = read_split(tmp_path / "s", "val")
    assert len(samples) == 359 and samples[0]["jpg"].size == (32, 32)
    assert {int(s["cls"]) for s in samples} == set(range(10))
    assert (tmp_path / "s/classes.tsv").read_text().splitlines()[3] == "3\tdigit3\tthree"


def test_one_split_at_a_time_keeps_the_other_in_the_manifest(folder_tree, tmp_path):
    out = tmp_path / "o"
    assert shard(folder_tree[0], out, "--splits", "train") == 0
    train_mtimes = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert shard(folder_tree[0], out, "--splits", "val") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["train", "val"]
    assert shard(folder_tree[0], out, "--splits", "train") == 0  # nothing to rebuild
    assert {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")} == train_mtimes


def test_hidden_and_system_folders_are_not_classes(tmp_path):
    make_tree(tmp_path / "src")
    for name in (".ipynb_checkpoints", "lost+found"):
        (tmp_path / "src/train" / name).mkdir()
    assert shard(tmp_path / "src", tmp_path / "o") == 0
    assert [line.split("\t")[1] for line in (tmp_path / "o/classes.tsv").read_text().splitlines()] == WNIDS


def test_flat_val_folder_in_folder_layout_is_an_error(tmp_path, capsys):
    make_tree(tmp_path / "src")
    Image.new("RGB", (50, 50)).save(tmp_path / "src/val/ILSVRC2012_val_00000001.JPEG")
    for wnid in WNIDS:
        for f in (tmp_path / "src/val" / wnid).iterdir():
            f.unlink()
        (tmp_path / "src/val" / wnid).rmdir()
    assert shard(tmp_path / "src", tmp_path / "o") == 2
    assert "holds images directly" in capsys.readouterr().err


def test_run_over_the_failure_budget_is_not_complete(folder_tree, tmp_path):
    from sagan.data import DataError, find_shards

    out = tmp_path / "o"
    assert main(["--src", str(folder_tree[0]), "--out", str(out), "--workers", "1", "--shard-size", "4"]) == 1
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    with pytest.raises(DataError, match="not complete"):
        find_shards(str(out / "train"))
    assert main(["--out", str(out), "--verify"]) == 1
    assert shard(folder_tree[0], out) == 0  # a higher budget completes it
    assert find_shards(str(out / "train")).num_samples == 25


def test_out_that_is_a_file_is_one_line(folder_tree, tmp_path, capsys):
    (tmp_path / "o").write_text("not a folder")
    assert main(["--src", str(folder_tree[0]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {tmp_path / 'o'} is a file; give a folder" in err and len(err.splitlines()) == 1


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def slow_run(src, out, shard_size: str, workers: str) -> subprocess.Popen:
    """shard_imagenet.py in a process of its own, each image taking 0.3 s longer to load."""
    slow = (
        "import time, preprocessing.shards as s\n"
        "orig = s.load_square\n"
        "def load(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return orig(*a, **k)\n"
        "s.load_square = load\n"
        "from preprocessing.shard_imagenet import main\n"
        f"main(['--src', {str(src)!r}, '--out', {str(out)!r}, '--shard-size', {shard_size!r}, '--workers', "
        f"{workers!r}, '--max-failures', '3'])\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", slow], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_pool_workers_exit_when_the_parent_is_killed(folder_tree, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = slow_run(folder_tree[0], out, "2", "2")  # still going when the parent dies
    deadline = time.time() + 60
    while not list(out.glob("train/*.tar")) and time.time() < deadline:
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the pool did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "pool workers outlived their parent"


@pytest.mark.parametrize("where", ["the source itself", "a folder inside it"])
def test_an_out_inside_src_is_refused_before_any_shard(where, folder_tree, capsys):
    src = folder_tree[0]
    out = src if where == "the source itself" else src / "shards"
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert main(["--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside --src" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing written into the source


def test_a_source_url_whose_store_does_not_answer_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }.items():
        monkeypatch.setenv(key, value)
    assert main(["--src", "s3://bucket/imagenet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --src=s3://bucket/imagenet") and len(err.splitlines()) == 1, err
    assert "AWS_ENDPOINT_URL" in err  # the fix
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "o").exists()


def test_a_second_run_on_the_same_out_is_refused_in_one_line(folder_tree, tmp_path, capsys):
    import os
    import signal
    import time

    out = tmp_path / "out"
    first = slow_run(folder_tree[0], out, "4", "1")  # still writing when the second starts
    try:
        deadline = time.time() + 60
        while not list(out.glob("train/*.tar")) and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could start"
        assert shard(folder_tree[0], out) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {out} is being written by another shard_imagenet.py (host " in err, err
        assert f"pid {first.pid}" in err and len(err.splitlines()) == 1
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # The killed run's lock names a dead pid: the next run takes it over with a warning and completes.
    assert shard(folder_tree[0], out) == 0
    assert "taking over the lock of --out" in capsys.readouterr().err
    assert not (out / ".shard_imagenet.lock").exists()
