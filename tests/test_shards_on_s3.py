"""Preprocessing into object storage, against a real S3 server on 127.0.0.1 (moto): the same bytes as on a disk,
nothing partial under a final key, the manifest last, reruns that skip what is there, and --verify reading it."""

import json
import os

from preprocessing.shard_imagenet import LOCK_FILE, ShardObjectLock
from sagan.storage import filesystem
from tests.servers import objects, read_object, upload, write_object
from tests.test_shard_imagenet import shard, tar_bytes


def test_shards_written_to_s3_are_the_bytes_written_to_a_disk(s3, folder_tree, folder_out, capsys):
    out = f"{s3}/imagenet"
    assert shard(folder_tree[0], out) == 0
    keys = objects(out)
    local = tar_bytes(folder_out)
    assert {k for k in keys if k.endswith(".tar")} == set(local)
    assert {k for k in keys if not k.endswith(".tar")} == {"manifest.json", "classes.tsv", "failures.jsonl"}
    assert all(read_object(f"{out}/{k}") == data for k, data in local.items())  # no temporary key is left
    manifest, on_disk = (
        json.loads(read_object(f"{out}/manifest.json")),
        json.loads((folder_out / "manifest.json").read_text()),
    )
    assert manifest["complete"] and manifest["splits"] == on_disk["splits"]
    assert read_object(f"{out}/classes.tsv") == (folder_out / "classes.tsv").read_bytes()
    assert f"-> {out}" in capsys.readouterr().out


def test_a_rerun_on_s3_rebuilds_exactly_what_is_missing_or_the_wrong_size(s3, folder_tree, folder_out, capsys):
    out = f"{s3}/imagenet"
    assert shard(folder_tree[0], out) == 0
    names = sorted(k for k in objects(out) if k.endswith(".tar"))
    deleted, cut = names[0], names[-1]
    fs, path = filesystem(out)
    fs.delete_file(f"{path}/{deleted}")
    write_object(f"{out}/{cut}", read_object(f"{out}/{cut}")[:-512])  # cut short by one tar block
    write_object(f"{out}/train/.imagenet128-train-000000.tar.tmp-1-abcdef01", b"left by a killed run")
    capsys.readouterr()
    assert shard(folder_tree[0], out) == 0
    assert "2 shard(s) to write" in capsys.readouterr().out
    local = tar_bytes(folder_out)
    assert sorted(k for k in objects(out) if k.endswith(".tar")) == sorted(local)
    assert read_object(f"{out}/{deleted}") == local[deleted] and read_object(f"{out}/{cut}") == local[cut]
    assert not [k for k in objects(out) if ".tmp-" in k]


def test_verify_on_s3_names_an_object_whose_bytes_were_replaced(s3, folder_tree, capsys):
    from preprocessing.shard_imagenet import main

    out = f"{s3}/imagenet"
    assert shard(folder_tree[0], out) == 0
    assert main(["--out", out, "--verify"]) == 0
    name = sorted(k for k in objects(out) if k.endswith(".tar"))[1]
    size = len(read_object(f"{out}/{name}"))
    write_object(f"{out}/{name}", os.urandom(size))  # the same size: only the hash tells
    capsys.readouterr()
    assert main(["--out", out, "--verify"]) == 1
    assert f"{out}/{name}: sha256 differs from the manifest" in capsys.readouterr().out


def test_a_second_run_against_a_live_s3_lock_is_refused_in_one_line(s3, folder_tree, capsys):
    out = f"{s3}/imagenet"
    with ShardObjectLock(out):
        assert shard(folder_tree[0], out) == 2
        assert LOCK_FILE in objects(out)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out} is being written by another shard_imagenet.py"), err
    assert len(err.splitlines()) == 1
    assert objects(out) == []  # nothing written, and the lock gone with its holder


def test_a_missing_bucket_for_out_is_one_line_before_any_work(s3, folder_tree, capsys):
    out = f"{s3}-missing/imagenet"
    assert shard(folder_tree[0], out) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out={out}" in err and "does not exist" in err and len(err.splitlines()) == 1


def test_shards_from_a_source_on_s3_are_the_bytes_of_shards_from_a_disk(s3, folder_tree, folder_out, tmp_path, capsys):
    root, made = folder_tree
    upload(root, f"{s3}/imagenet-raw")  # the fake ImageNet, with its odd and undecodable files
    out = tmp_path / "shards"
    assert shard(f"{s3}/imagenet-raw", out) == 0
    assert tar_bytes(out) == tar_bytes(folder_out)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["path"] for f in failures) == sorted(
        p.replace(str(root), f"{s3}/imagenet-raw") for p in made["bad"]
    )
    assert json.loads((out / "manifest.json").read_text())["source"]["path"] == f"{s3}/imagenet-raw"
    assert (out / "classes.tsv").read_bytes() == (folder_out / "classes.tsv").read_bytes()  # names read there too
    capsys.readouterr()
    assert shard(f"{s3}/imagenet-raw", f"{s3}/imagenet-raw/shards") == 2  # --out inside --src
    assert "is inside --src" in capsys.readouterr().err
    assert shard("s3://no-such-bucket/raw", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --src=s3://no-such-bucket/raw: the bucket no-such-bucket does not exist"), err
    assert len(err.splitlines()) == 1
    assert shard(f"{s3}/nothing-here", tmp_path / "other") == 2
    assert "holds nothing" in capsys.readouterr().err
