"""What each step trained on, for tests and for checking a resume or a resize by hand. With SAGAN_BATCH_LOG set
to a folder, every rank appends one line per step to FOLDER/rank-R-PID.jsonl:

    {"step": 5, "rank": 0, "world": 2, "samples": ["3f2a...", ...]}

one id per image of the step's batches (optim.n_dis of them): a hash of its pixels and label, the same whatever
the device, the loader or the storage that produced it. Unset (the default), it costs nothing.
"""

import hashlib
import json
import os
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
        self.file.write(json.dumps({"step": step, "rank": self.rank, "world": self.world, "samples": ids}) + "\n")
        self.file.flush()


def read_log(folder: Path) -> dict[int, list[str]]:
    """{step: the sorted ids of every rank's samples of that step} from a SAGAN_BATCH_LOG folder; a step logged
    again (a retry or a relaunch from an earlier checkpoint) counts once per rank, its last logging."""
    per_rank: dict[tuple[int, int], list[str]] = {}
    for path in sorted(Path(folder).glob("rank-*.jsonl"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            per_rank[(entry["step"], entry["rank"])] = entry["samples"]
    steps: dict[int, list[str]] = {}
    for (step, _), ids in sorted(per_rank.items()):
        steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}
