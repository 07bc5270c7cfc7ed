"""The input pipeline: batches decoded in background processes, in an order that depends only on (seed,
epoch, rank, world size), resumable at any batch without reading the batches before it."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sagan.loader as loader
from sagan.data import DataError, find_shards
from sagan.loader import PlannedBatches, epoch_plan, iter_uint8, rank_loader

REPO = Path(__file__).resolve().parent.parent


def take(iterator, n: int) -> list:
    return list(itertools.islice(iterator, n))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_the_order_does_not_depend_on_the_number_of_loader_processes(digits):
    shards = find_shards(str(digits / "train"))
    in_process = take(rank_loader(shards, 1, 2, 16, seed=3, start_batch=0, workers=0), 20)
    assert same(take(rank_loader(shards, 1, 2, 16, seed=3, start_batch=0, workers=2, prefetch=2), 20), in_process)
    assert in_process[0][0].dtype == torch.uint8 and in_process[0][0].shape == (16, 3, 32, 32)


def test_every_sample_of_a_rank_share_appears_once_per_epoch_and_ranks_do_not_overlap(digits):
    shards = find_shards(str(digits / "train"))
    plans = [epoch_plan(shards, rank, 2, 16, epoch=0, seed=0) for rank in (0, 1)]
    assert plans[0].shape == plans[1].shape  # every rank gets batches_per_epoch batches
    refs = [{tuple(p) for p in plan.reshape(-1, 2).tolist()} for plan in plans]
    assert len(refs[0]) == plans[0].shape[0] * 16 and not refs[0] & refs[1]
    assert {s for s, _ in refs[0]}.isdisjoint({s for s, _ in refs[1]})  # shards are dealt whole to ranks
    again = epoch_plan(shards, 0, 2, 16, epoch=1, seed=0)
    assert not (again == plans[0]).all()  # a new order each epoch


def test_a_resumed_run_gets_exactly_the_batches_an_uninterrupted_one_gets(digits):
    shards = find_shards(str(digits / "train"))
    per_epoch = PlannedBatches(shards, 0, 2, 16, seed=0).per_epoch
    k = per_epoch - 2  # the resume point is 2 batches before an epoch ends: the run goes on into the next
    continuous = take(rank_loader(shards, 0, 2, 16, seed=0, start_batch=0), 2 * k)
    resumed = take(rank_loader(shards, 0, 2, 16, seed=0, start_batch=k, workers=1), k)
    assert same(resumed, continuous[k:])


def test_resuming_decodes_nothing_before_the_resume_point(digits, monkeypatch):
    shards = find_shards(str(digits / "train"))
    decoded = []
    original = loader.decode_jpeg
    monkeypatch.setattr(loader, "decode_jpeg", lambda data: decoded.append(1) or original(data))
    start = time.perf_counter()
    take(rank_loader(shards, 0, 1, 16, seed=0, start_batch=10_000 // 16), 1)  # 10,000 samples in (epochs on)
    assert len(decoded) == 16  # the one batch asked for, nothing before it
    assert time.perf_counter() - start < 3.0  # well under a second on an idle machine


def test_a_corrupt_sample_read_by_a_loader_process_is_one_line_naming_shard_and_key(digits, tmp_path):
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(digits, root)
    shards = find_shards(str(root / "train"))
    first_key, members = loader.tar_index(shards.urls[0])[0]
    offset, size = members["jpg"]
    with open(shards.urls[0], "r+b") as f:  # the JPEG's bytes overwritten: the tar still reads
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(DataError) as e:
        list(iter_uint8(shards, 64, workers=2))
    message = str(e.value)
    assert message.startswith(f"shard {shards.urls[0]}: sample {first_key}: ") and len(message.splitlines()) == 1


def _stat(pid: int) -> list[str] | None:
    """(state, ppid, ...) of a live process, None for a gone or zombie one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if (_stat(int(p.name)) or ["", ""])[1] == str(pid)]


def test_loader_processes_end_with_the_loop(digits):
    shards = find_shards(str(digits / "train"))
    before = set(_children(os.getpid()))  # Ray's processes, when the session started it
    stream = rank_loader(shards, 0, 1, 16, seed=0, start_batch=0, workers=2)
    take(stream, 3)
    workers = set(_children(os.getpid())) - before
    assert len(workers) == 2
    stream.close()  # as the training loop does when it ends
    deadline = time.time() + 10
    while any(_stat(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert [w for w in workers if _stat(w)] == []


def test_loader_processes_end_when_the_training_process_is_killed(digits):
    script = (
        "import itertools, time, sys\n"
        "from sagan.data import find_shards\n"
        "from sagan.loader import rank_loader\n"
        f"s = rank_loader(find_shards({str(digits / 'train')!r}), 0, 1, 16, 0, 0, workers=2)\n"
        "list(itertools.islice(s, 2)); print('ready', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = _children(proc.pid)
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20  # torch's workers check on their parent every 5 s
    while any(_stat(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert [w for w in workers if _stat(w)] == []


def test_virtual_ranks_give_each_step_the_same_samples_at_every_world_size(digits):
    """An elastic run plans its data for `virtual` ranks: whether 1, 2 or 4 workers serve 4 virtual ranks, and
    from whichever batch a worker group starts, step k trains on the same samples, each virtual rank's in order."""
    shards = find_shards(digits / "train")

    def step_batches(world: int, start: int, n: int) -> list[torch.Tensor]:
        workers = [rank_loader(shards, r, world, 2, seed=3, start_batch=start, virtual=4) for r in range(world)]
        steps = [[next(w) for w in workers] for _ in range(n)]
        for w in workers:
            w.close()
        # worker r serves virtual ranks r, r + world, ...: put the 2-sample slices back in virtual-rank order
        out = []
        for batches in steps:
            slices = {
                v: x[2 * i : 2 * i + 2]
                for r, (x, _) in enumerate(batches)
                for i, v in enumerate(loader.serving(r, world, 4))
            }
            out.append(torch.cat([slices[v] for v in range(4)]))
        return out

    reference = step_batches(4, 0, 6)
    for world in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(step_batches(world, 0, 6), reference))
    assert all(torch.equal(a, b) for a, b in zip(step_batches(2, 3, 3), reference[3:]))  # a resize at step 3
    with pytest.raises(ValueError, match="3 workers cannot serve 2 virtual ranks"):
        loader.serving(0, 3, 2)
