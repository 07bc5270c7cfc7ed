"""Finding an ImageNet copy's images and labels, and planning which sample goes into which shard.

Two layouts are recognised:
  (a) folders:  SRC/train/<wnid>/*.JPEG and SRC/val/<wnid>/*.JPEG
  (b) Kaggle:   SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/*, val/*} with SRC/LOC_val_solution.csv for val labels
Class index = position of the wnid in the sorted list of train folders (n01440764 -> 0), the order of
LOC_synset_mapping.txt. Human names come from SRC/LOC_synset_mapping.txt (or synset_words.txt) if present.
"""

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sagan.errors import UserError

KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


class SourceError(UserError, ValueError):
    """The source folder is not an ImageNet copy we can read; the message says what is missing."""


@dataclass(frozen=True)
class Sample:
    key: str  # WebDataset key: the file stem made safe (no dots, no path separators), unique per split
    path: str  # absolute path of the source file
    label: int
    wnid: str


@dataclass
class Source:
    layout: str  # "folders" or "kaggle"
    root: Path
    split_dirs: dict[str, Path]  # split -> folder holding it
    wnids: list[str]  # sorted train wnids: index = class
    names: dict[str, str]  # wnid -> human name, where known


def detect_source(src: str | Path) -> Source:
    """The layout, split folders and class table of the ImageNet copy at `src`; SourceError if none fits."""
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"--src {src} is not a directory; point it at an ImageNet copy")
    if (root / KAGGLE_ROOT).is_dir():
        layout, base = "kaggle", root / KAGGLE_ROOT
    elif (root / "train").is_dir() or (root / "val").is_dir():
        layout, base = "folders", root
    else:
        raise SourceError(
            f"--src {root} has neither train/ or val/ folders nor {KAGGLE_ROOT}/: "
            "expected SRC/train/<wnid>/*.JPEG (or the Kaggle layout)"
        )
    split_dirs = {s: base / s for s in ("train", "val") if (base / s).is_dir()}
    if "train" not in split_dirs:
        raise SourceError(f"{base / 'train'} is missing: the class table is read from the train folders")
    wnids = [p.name for p in _class_dirs(split_dirs["train"])]
    if not wnids:
        raise SourceError(f"{split_dirs['train']} has no class folders (expected train/<wnid>/...)")
    return Source(layout, root, split_dirs, wnids, _read_names(root))


IGNORED_DIRS = {"lost+found", "@eaDir"}


def _class_dirs(folder: Path) -> list[Path]:
    """Class folders of a split, sorted; hidden and system folders (.snapshot, lost+found) are not classes."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_DIRS
    )


def _read_names(root: Path) -> dict[str, str]:
    for name in NAME_FILES:
        path = root / name
        if path.is_file():
            pairs = (line.strip().split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
            return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}
    return {}


def safe_key(stem: str) -> str:
    """A WebDataset key from a file stem: anything but letters, digits, '-' and '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"


def _unique_keys(stems: list[str]) -> list[str]:
    """Safe keys for `stems` (in order), suffixed with _2, _3... where two would collide."""
    seen: dict[str, int] = {}
    keys = []
    for stem in stems:
        key = base = safe_key(stem)
        while key in seen:
            seen[base] += 1
            key = f"{base}_{seen[base]}"
        seen[key] = 1
        keys.append(key)
    return keys


def _files(folder: Path) -> list[Path]:
    # scandir reads file types from the directory itself: no stat per file on 1.28M images over NFS
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and not e.name.startswith("."))


def _kaggle_val_labels(root: Path) -> dict[str, str]:
    csv_path = root / "LOC_val_solution.csv"
    if not csv_path.is_file():
        raise SourceError(f"{csv_path} is missing: the Kaggle layout labels val images with it")
    labels = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    return labels


def list_samples(source: Source, split: str) -> list[Sample]:
    """Every file of `split`, sorted by path, with its key and label; SourceError on an unknown val wnid."""
    index = {w: i for i, w in enumerate(source.wnids)}
    folder = source.split_dirs[split]
    pairs: list[tuple[Path, str]] = []
    if split == "val" and source.layout == "kaggle":
        labels = _kaggle_val_labels(source.root)
        for path in _files(folder):
            if path.stem not in labels:
                raise SourceError(f"val image {path.name} has no row in LOC_val_solution.csv")
            pairs.append((path, labels[path.stem]))
    else:
        class_dirs = _class_dirs(folder)
        if not class_dirs and _files(folder):
            raise SourceError(
                f"{folder} holds images directly, not in <wnid>/ folders; sort val into class folders "
                "(e.g. with LOC_val_solution.csv) or use the Kaggle layout"
            )
        for wnid_dir in class_dirs:
            pairs.extend((path, wnid_dir.name) for path in _files(wnid_dir))
    if not pairs:
        raise SourceError(f"{folder} holds no images for split '{split}'")
    unknown = sorted({w for _, w in pairs} - set(index))
    if unknown:
        raise SourceError(f"{split} has classes not among the train folders: {unknown[:5]}")
    keys = _unique_keys([p.stem for p, _ in pairs])
    return [Sample(k, str(p), index[w], w) for k, (p, w) in zip(keys, pairs)]


def plan_shards(samples: list[Sample], shard_size: int, seed: int, limit: int | None = None) -> list[list[Sample]]:
    """Samples spread over ceil(n / shard_size) shards by a seeded permutation; sizes within one."""
    order = np.random.default_rng(seed).permutation(len(samples))
    if limit is not None:
        order = order[:limit]
    if len(order) == 0:
        return []
    n_shards = -(-len(order) // shard_size)
    return [[samples[i] for i in part] for part in np.array_split(order, n_shards)]


def plan_hash(shard: list[Sample]) -> str:
    """A fingerprint of what a shard should hold (keys, sources, labels), to tell a stale shard from a good one."""
    text = json.dumps([(s.key, s.path, s.label) for s in shard])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
