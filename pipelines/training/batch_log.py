"""What each step trained on, for tests and for checking a resume or a resize by hand. With SAGAN_BATCH_LOG set
to a folder, every rank appends one line per step to FOLDER/rank-R-PID.jsonl:

    {"step": 5, "rank": 0, "world": 2, "time": 1796000000.0, "samples": ["3f2a...", ...]}

one id per image of the step's batches (optim.n_dis of them): a hash of its pixels and label, the same whatever
the device, the loader or the storage that produced it. Unset (the default), it costs nothing.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import torch

ENV = "SAGAN_BATCH_LOG"


def sample_ids(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """An id per image of a uint8 batch (B, 3, R, R) and its labels (B,)."""
    pixels, labels = images.cpu().contiguous().numpy(), labels.cpu().tolist()
    return [hashlib.sha256(p.tobytes() + str(c).encode()).hexdigest()[:16] for p, c in zip(pixels, labels)]


class BatchLog:
    """One rank's log of its steps' samples, or a no-op when SAGAN_BATCH_LOG is unset."""

    def __init__(self, rank: int, world: int):
        folder = os.environ.get(ENV)
        self.rank, self.world, self.file = rank, world, None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"rank-{rank}-{os.getpid()}.jsonl", "a")

    def record(self, step: int, batches: list) -> None:
        """`batches`: the step's (images in [-1, 1], labels) pairs, as the loop trains on them."""
        if self.file is None:
            return
        ids = []
        for x, y in batches:
            ids += sample_ids(((x.detach() + 1) * 127.5).round().to(torch.uint8), y)
        entry = {"step": step, "rank": self.rank, "world": self.world, "time": time.time(), "samples": ids}
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()


def read_log(folder: Path) -> dict[int, list[str]]:
    """{step: the sorted ids of every rank's samples of that step} from a SAGAN_BATCH_LOG folder. A step logged
    again (a retry or a resized group going on from an earlier checkpoint) counts as its last group logged it:
    the ranks of the world size of its latest line."""
    lines = []
    for path in Path(folder).glob("rank-*.jsonl"):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple[int, int, int], dict] = {}  # (step, world, rank) -> its latest line
    last_world: dict[int, tuple[float, int]] = {}  # step -> (time, world) of its latest line
    for e in sorted(lines, key=lambda e: e["time"]):
        latest[(e["step"], e["world"], e["rank"])] = e
        last_world[e["step"]] = (e["time"], e["world"])
    steps = {}
    for step, (_, world) in sorted(last_world.items()):
        steps[step] = sorted(i for r in range(world) for i in latest.get((step, world, r), {}).get("samples", []))
    return steps


def entries(folder: Path) -> list[dict]:
    """Every line of a SAGAN_BATCH_LOG folder so far, while a run may still write it (a line being written,
    cut short, is left out)."""
    out = []
    for path in Path(folder).glob("rank-*.jsonl") if Path(folder).is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def worlds_after(folder: Path, since: float) -> set[int]:
    """The world sizes of the steps logged at or after `since` (seconds since the epoch)."""
    return {e["world"] for e in entries(folder) if e["time"] >= since}


def first_step_time(folder: Path, since: float, world: int) -> float:
    """When the first step of a group of `world` workers at or after `since` was taken."""
    return min(e["time"] for e in entries(folder) if e["time"] >= since and e["world"] == world)
