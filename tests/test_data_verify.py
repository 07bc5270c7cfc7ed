"""Damaged shards are found before the first training step (data.verify), and a shard that fails to read while
training names its file and sample."""

import io
import os
import shutil

import pytest
import webdataset as wds
from PIL import Image

from pipelines.common.config import load_config
from pipelines.train import main
from pipelines.training.preflight import PreflightError, preflight, verify_shards
from sagan.data import DataError, ShardSet, find_shards
from sagan.loader import iter_uint8, rank_batches

CLUSTER = {"CPU": 4}  # what preflight is told the cluster has; enough for the default two workers


@pytest.fixture
def shards(digits, tmp_path):
    """A private copy of the session's sample shards, safe to damage."""
    return shutil.copytree(digits, tmp_path / "shards", ignore=shutil.ignore_patterns("cache"))


def cfg_for(shards, tmp_path, *overrides):
    return load_config(
        None,
        [
            f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val'}",
            f"run.storage_path={tmp_path / 'runs'}",
            "train.eval_every=10",
            *overrides,
        ],
    )


def first_shard(shards, split="train"):
    return sorted((shards / split).glob("*.tar"))[0]


def truncate(path, keep=0.5):
    os.truncate(path, int(path.stat().st_size * keep))


def overwrite_middle(path, n=4096):
    """Replace n bytes in the middle of `path` with random ones: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(n))


@pytest.mark.parametrize("split", ["train", "val"])  # val: the real images of the in-loop FID
def test_truncated_shard_fails_preflight_in_one_line_naming_it(shards, tmp_path, split):
    path = first_shard(shards, split)
    size = path.stat().st_size
    truncate(path)
    with pytest.raises(PreflightError) as err:
        preflight(cfg_for(shards, tmp_path), CLUSTER)
    message = str(err.value)
    assert message.startswith(
        f"data.{split}_shards: shard {path} is damaged: the manifest says {size} bytes, found {size // 2} bytes"
    )
    assert "preprocessing/shard_imagenet.py" in message and f"--out {shards} --verify" in message
    assert len(message.splitlines()) == 1


def test_overwritten_shard_fails_full_verification_naming_it(ray_session, shards, tmp_path, capsys):
    path = first_shard(shards)
    overwrite_middle(path)
    cfg = cfg_for(shards, tmp_path)
    preflight(cfg, CLUSTER)  # the size is right: only the hash can tell
    with pytest.raises(
        PreflightError,
        match=rf"^shard {path} is damaged: its sha256 is \w{{12}}\.\.\., the manifest says \w{{12}}\.\.\.; delete it",
    ):
        verify_shards(cfg)
    assert "verifying 10 shards" in capsys.readouterr().out  # 8 train + 2 val


def test_intact_shards_verify_in_one_progress_line(ray_session, shards, tmp_path, capsys):
    verify_shards(cfg_for(shards, tmp_path, "scaling.num_workers=2"))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("verifying 10 shards (0.01 GB) with sha256 on 2 tasks ... ok in ") and line.endswith(
        " MB/s)"
    )


def test_size_mode_checks_sizes_but_does_not_hash(shards, tmp_path, capsys):
    overwrite_middle(first_shard(shards))
    cfg = cfg_for(shards, tmp_path, "data.verify=size")
    preflight(cfg, CLUSTER)
    verify_shards(cfg)  # no Ray here: hashing would need it, and would fail on this shard
    assert capsys.readouterr().out == ""
    truncate(first_shard(shards))
    with pytest.raises(PreflightError, match="is damaged: the manifest says"):
        preflight(cfg, CLUSTER)


def test_off_skips_both_checks(shards, tmp_path):
    truncate(first_shard(shards))
    cfg = cfg_for(shards, tmp_path, "data.verify=off")
    preflight(cfg, CLUSTER)
    verify_shards(cfg)


def write_tar(path, jpgs: dict[str, bytes]):
    with wds.TarWriter(str(path), encoder=False) as tar:
        for key, jpg in jpgs.items():
            tar.write({"__key__": key, "jpg": jpg, "cls": b"3"})


def test_corrupt_member_raises_data_error_naming_shard_and_key(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="JPEG")
    path = tmp_path / "bad.tar"
    write_tar(path, {f"s{i}": buf.getvalue() for i in range(5)} | {"s5": b"not a jpeg"})
    shard_set = ShardSet(
        urls=[str(path)],
        counts=[6],
        num_classes=10,
        image_size=32,
        manifest=tmp_path / "manifest.json",
        key="",
        sizes=[path.stat().st_size],
        sha256s=[""],
    )
    with pytest.raises(DataError, match=rf"^shard {path}: sample s5: \w+: .*; delete it and re-run"):
        list(rank_batches(shard_set, 0, 1, 2, epoch=0))


@pytest.mark.parametrize("cut", [5000, 512 * 37], ids=["inside-a-member", "at-a-header"])
def test_truncated_tar_read_in_training_names_the_shard(shards, cut):
    path = first_shard(shards)
    os.truncate(path, cut)  # found after preflight: the file was cut while training ran
    shard_set = find_shards(str(shards / "train"))
    with pytest.raises(DataError, match=rf"^shard {path}: .*(unexpected end of data|the manifest says 180)"):
        list(iter_uint8(shard_set, 50))


def test_damaged_shard_stops_train_before_any_worker(ray_session, shards, tmp_path, capsys):
    path = first_shard(shards)
    overwrite_middle(path)
    args = [
        f"data.train_shards={shards / 'train'}",
        f"data.val_shards={shards / 'val'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"eval.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: shard {path} is damaged: its sha256 is ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "sagan-demo").exists() and not (tmp_path / "cache").exists()


def test_a_shard_damaged_after_the_check_stops_the_run_naming_shard_and_key_without_retries(
    ray_session, shards, tmp_path, capsys
):
    from sagan.loader import tar_index

    shard_set = find_shards(str(shards / "train"))
    key, members = tar_index(shard_set.urls[0])[3]
    offset, size = members["jpg"]
    with open(shard_set.urls[0], "r+b") as f:  # the JPEG's bytes zeroed: the tar still reads, the image does not
        f.seek(offset)
        f.write(b"\0" * size)
    args = [
        f"data.train_shards={shards / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "data.verify=off",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "model.ch=8",
        "train.batch_size=4",
        "train.steps=400",
        "train.eval_every=0",
        "run.max_failures=2",
        "run.name=damaged",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data error at step ") and f"shard {shard_set.urls[0]}: sample {key}: " in err
    assert main(args) == 1  # a relaunch stops at once with the same line: the marker, not a replay
    assert f"sample {key}" in capsys.readouterr().err
