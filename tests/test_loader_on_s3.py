"""The loader on object storage, against a real S3 server on 127.0.0.1 (moto): the same batches as from a local
copy of the same shards, exact resume, whole-shard reads (one request per shard), a shared local cache, and a
damaged or missing object named in one line."""

import os

import pytest

from sagan.data import DataError, find_shards, size_mismatch
from sagan.loader import iter_uint8, rank_loader
from tests.servers import objects, read_object, upload, write_object
from tests.test_loader import same, take


@pytest.fixture
def on_s3(s3, digits):
    """The session's digit shards uploaded to a fresh bucket: (local root, its URL)."""
    upload(digits, f"{s3}/digits")
    return digits, f"{s3}/digits"


def with_cache(shards, folder, limit: int = 10**12):
    shards.cache_dir, shards.cache_bytes = str(folder), limit
    return shards


def test_shards_on_s3_are_found_with_the_key_of_the_same_content_on_disk(on_s3):
    local, url = on_s3
    for where in (f"{url}/train", url, f"{url}/manifest.json", f"{url}/train/imagenet32-train-{{000000..000007}}.tar"):
        shards = find_shards(where)
        assert shards.urls[0].startswith(f"{url}/train/") and shards.remote
        assert shards.key == find_shards(str(local / "train")).key and shards.counts == find_shards(str(local)).counts
    assert size_mismatch(find_shards(url)) is None


@pytest.mark.parametrize("cache", [False, True], ids=["in memory", "in data.cache_dir"])
def test_batches_from_s3_equal_batches_from_a_local_copy_and_resume_exactly(on_s3, s3_server, tmp_path, cache):
    local, url = on_s3
    shards = find_shards(f"{url}/train")
    if cache:
        with_cache(shards, tmp_path / "cache")
    expected = take(rank_loader(find_shards(str(local / "train")), 1, 2, 16, seed=3, start_batch=0), 30)
    assert same(take(rank_loader(shards, 1, 2, 16, seed=3, start_batch=0, workers=2, prefetch=2), 30), expected)
    assert same(take(rank_loader(shards, 1, 2, 16, seed=3, start_batch=17, workers=1), 13), expected[17:])
    bucket = url.removeprefix("s3://").split("/")[0]
    gets = [p for m, p in s3_server.requests(f"/{bucket}/digits/train/") if m == "GET"]
    per_shard = {p: gets.count(p) for p in gets}
    # Whole shards, one GET each: in memory, each loader process fetches the shards its batches read (3 loaders
    # here); through the cache, each shard once for all of them.
    assert per_shard and max(per_shard.values()) <= (1 if cache else 3), per_shard
    if cache:
        assert sorted(os.listdir(tmp_path / "cache")) == sorted(
            f"{h}.tar{ext}"
            for h in {shards.sha256s[int(p.split("-")[-1][:6])] for p in per_shard}
            for ext in ("", ".lock")
        )


def test_a_filled_cache_serves_a_second_pass_without_the_store(on_s3, tmp_path):
    local, url = on_s3
    shards = with_cache(find_shards(f"{url}/val", "val"), tmp_path / "cache")
    first = list(iter_uint8(shards, 64, workers=2))
    fs_objects = [k for k in objects(url) if k.startswith("val/")]
    for key in fs_objects:  # the bucket loses the shards: only the cache can answer now
        write_object(f"{url}/{key}", b"")
    assert same(list(iter_uint8(shards, 64, workers=2)), first)
    assert same(first, list(iter_uint8(find_shards(str(local / "val"), "val"), 64)))


def test_the_cache_stays_within_its_size(on_s3, tmp_path):
    _, url = on_s3
    shards = find_shards(f"{url}/train")
    limit = sorted(shards.sizes)[-1] * 2  # room for two shards
    list(iter_uint8(with_cache(shards, tmp_path / "cache", limit), 64))
    cached = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tar")]
    assert 1 <= len(cached) <= 2 and sum(os.path.getsize(tmp_path / "cache" / f) for f in cached) <= limit


@pytest.mark.parametrize("damage", ["random bytes of the same size", "the object deleted"])
def test_a_damaged_or_missing_object_is_named_in_one_line(on_s3, damage):
    _, url = on_s3
    shards = find_shards(f"{url}/train")
    victim = shards.urls[0]
    data = read_object(victim)
    if damage == "the object deleted":
        from sagan.storage import filesystem

        fs, path = filesystem(victim)
        fs.delete_file(path)
        expected = "is missing: no such object"
    else:
        write_object(victim, os.urandom(len(data)))
        expected = "is damaged: its sha256 is"
    with pytest.raises(DataError) as e:
        list(iter_uint8(shards, 64, workers=1))
    message = str(e.value)
    assert message.startswith(f"shard {victim} {expected}") and len(message.splitlines()) == 1, message
    assert f"--out {url} --verify" in message


def test_a_loader_process_prefetches_only_shards_its_own_batches_read(digits):
    """With N loader processes, each reads every N-th batch: what it fetches ahead must be read by it, or the
    bytes (or open files) of shards it never opens would pile up in it."""
    import numpy as np

    from sagan.loader import LOOKAHEAD, PlannedBatches, SequentialBatches

    shards = find_shards(str(digits / "train"))
    for dataset in (SequentialBatches(shards, 40), PlannedBatches(shards, 0, 1, 40, seed=0)):
        n = len(dataset) if isinstance(dataset, SequentialBatches) else dataset.per_epoch
        for stride in (1, 2, 3):
            ahead = []
            for g in range(n):
                dataset.refs(g)
                upcoming = dataset.upcoming(g, stride)
                window = range(g + stride, min(n, g + 1 + LOOKAHEAD), stride)  # its own next batches, ahead
                own = np.concatenate([dataset.refs(h) for h in window] or [np.zeros((0, 2))])
                assert set(upcoming) <= {int(s) for s in own[:, 0]}, (type(dataset).__name__, stride, g)
                ahead += upcoming
            assert ahead  # something is fetched ahead at every stride


def test_a_worker_serving_several_virtual_ranks_fetches_each_shard_once_per_epoch(on_s3, s3_server, monkeypatch):
    """An elastic worker's batch holds each virtual rank's batch, each from its own group of shards: the shards
    kept in memory scale with the ranks served, or every batch would download its shards again."""
    import sagan.loader

    monkeypatch.setattr(sagan.loader, "REMOTE_IN_MEMORY", 2)  # one group of 2 shards per virtual rank, kept
    _, url = on_s3
    shards = find_shards(f"{url}/train")
    batches = rank_loader(shards, 0, 1, 8, seed=3, start_batch=0, virtual=3)  # 3 virtual ranks, 2 shards each
    per_epoch = sagan.loader.batches_per_epoch(shards, 3, 8)
    take(batches, per_epoch)
    bucket = url.removeprefix("s3://").split("/")[0]
    gets = [p for m, p in s3_server.requests(f"/{bucket}/digits/train/") if m == "GET"]
    assert len(gets) == len(set(gets)) == 6, gets  # 6 shards read, each downloaded once
