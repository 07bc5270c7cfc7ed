"""Finding an ImageNet copy's images and labels, and planning which sample goes into which shard.

SRC is a folder or an object-storage prefix (s3://bucket/prefix, gs://...). Two layouts are recognised:
  (a) folders:  SRC/train/<wnid>/*.JPEG and SRC/val/<wnid>/*.JPEG
  (b) Kaggle:   SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/*, val/*} with SRC/LOC_val_solution.csv for val labels
Class index = position of the wnid in the sorted list of train folders (n01440764 -> 0), the order of
LOC_synset_mapping.txt. Human names come from SRC/LOC_synset_mapping.txt (or synset_words.txt) if present.
"""

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sagan.errors import UserError
from sagan.folder import Folder
from sagan.storage import is_url

KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC"
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
IGNORED_DIRS = {"lost+found", "@eaDir"}


class SourceError(UserError, ValueError):
    """The source folder is not an ImageNet copy we can read; the message says what is missing."""


@dataclass(frozen=True)
class Sample:
    key: str  # WebDataset key: the file stem made safe (no dots, no path separators), unique per split
    path: str  # absolute path of the source file, or its URL (s3://...)
    label: int
    wnid: str


class Tree:
    """The source folder, on a disk or under an object-storage prefix (s3://bucket/prefix: a listing request per
    folder, never one per file): what finding the layout and listing the images need of it. Folders are named
    by their parts relative to the root ("train/n01440764"); hidden entries are skipped."""

    def __init__(self, src: str | Path):
        self.remote = is_url(src)
        self.folder = Folder(str(src)) if self.remote else None
        self.root = self.folder.name if self.remote else str(Path(src).expanduser().resolve())

    def path(self, rel: str = "") -> str:
        """The path or URL of `rel`."""
        return f"{self.root}/{rel}" if rel else self.root

    def is_dir(self, rel: str = "") -> bool:
        if not self.remote:
            return Path(self.path(rel)).is_dir()
        import pyarrow.fs as pafs

        return self.folder.fs.get_file_info(self.folder._path(rel) if rel else self.folder.root).type == (
            pafs.FileType.Directory
        )

    def dirs(self, rel: str) -> list[str]:
        """The folders directly in `rel`, sorted; hidden and system folders (.snapshot, lost+found) left out."""
        if self.remote:
            names = self.folder.dirs("*", rel)
        else:
            names = [p.name for p in Path(self.path(rel)).iterdir() if p.is_dir()]
        return sorted(n for n in names if not n.startswith(".") and n not in IGNORED_DIRS)

    def files(self, rel: str) -> list[str]:
        """The names of the files directly in `rel`, sorted; hidden files left out."""
        if self.remote:
            names = list(self.folder.files(rel, "*"))
        else:
            # scandir reads file types from the directory itself: no stat per file on 1.28M images over NFS
            with os.scandir(self.path(rel)) as entries:
                names = [e.name for e in entries if e.is_file()]
        return sorted(n for n in names if not n.startswith("."))

    def read_text(self, rel: str) -> str | None:
        """The file's text, None when there is none."""
        if self.remote:
            return self.folder.read_text(rel)
        path = Path(self.path(rel))
        return path.read_text() if path.is_file() else None


@dataclass
class Source:
    layout: str  # "folders" or "kaggle"
    tree: Tree
    split_dirs: dict[str, str]  # split -> folder holding it, relative to the root
    wnids: list[str]  # sorted train wnids: index = class
    names: dict[str, str]  # wnid -> human name, where known

    @property
    def root(self) -> str:
        return self.tree.root


def detect_source(src: str | Path) -> Source:
    """The layout, split folders and class table of the ImageNet copy at `src` (a folder, or an object-storage
    prefix); SourceError if none fits."""
    tree = Tree(src)
    if not tree.is_dir():
        what = "holds nothing (no such prefix)" if tree.remote else "is not a directory"
        raise SourceError(f"--src {src} {what}; point it at an ImageNet copy")
    if tree.is_dir(KAGGLE_ROOT):
        layout, base = "kaggle", KAGGLE_ROOT + "/"
    elif tree.is_dir("train") or tree.is_dir("val"):
        layout, base = "folders", ""
    else:
        raise SourceError(
            f"--src {tree.root} has neither train/ or val/ folders nor {KAGGLE_ROOT}/: "
            "expected SRC/train/<wnid>/*.JPEG (or the Kaggle layout)"
        )
    split_dirs = {s: base + s for s in ("train", "val") if tree.is_dir(base + s)}
    if "train" not in split_dirs:
        raise SourceError(f"{tree.path(base + 'train')} is missing: the class table is read from the train folders")
    wnids = tree.dirs(split_dirs["train"])
    if not wnids:
        raise SourceError(f"{tree.path(split_dirs['train'])} has no class folders (expected train/<wnid>/...)")
    return Source(layout, tree, split_dirs, wnids, _read_names(tree))


def _read_names(tree: Tree) -> dict[str, str]:
    for name in NAME_FILES:
        text = tree.read_text(name)
        if text is not None:
            pairs = (line.strip().split(maxsplit=1) for line in text.splitlines() if line.strip())
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


def _kaggle_val_labels(tree: Tree) -> dict[str, str]:
    text = tree.read_text("LOC_val_solution.csv")
    if text is None:
        raise SourceError(
            f"{tree.path('LOC_val_solution.csv')} is missing: the Kaggle layout labels val images with it"
        )
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(io.StringIO(text))}


def list_samples(source: Source, split: str) -> list[Sample]:
    """Every file of `split`, sorted by path, with its key and label; SourceError on an unknown val wnid."""
    tree, index = source.tree, {w: i for i, w in enumerate(source.wnids)}
    folder = source.split_dirs[split]
    pairs: list[tuple[str, str]] = []  # (path relative to the root, wnid)
    if split == "val" and source.layout == "kaggle":
        labels = _kaggle_val_labels(tree)
        for name in tree.files(folder):
            if Path(name).stem not in labels:
                raise SourceError(f"val image {name} has no row in LOC_val_solution.csv")
            pairs.append((f"{folder}/{name}", labels[Path(name).stem]))
    else:
        class_dirs = tree.dirs(folder)
        if not class_dirs and tree.files(folder):
            raise SourceError(
                f"{tree.path(folder)} holds images directly, not in <wnid>/ folders; sort val into class folders "
                "(e.g. with LOC_val_solution.csv) or use the Kaggle layout"
            )
        for wnid in class_dirs:
            pairs.extend((f"{folder}/{wnid}/{name}", wnid) for name in tree.files(f"{folder}/{wnid}"))
    if not pairs:
        raise SourceError(f"{tree.path(folder)} holds no images for split '{split}'")
    unknown = sorted({w for _, w in pairs} - set(index))
    if unknown:
        raise SourceError(f"{split} has classes not among the train folders: {unknown[:5]}")
    keys = _unique_keys([Path(rel).stem for rel, _ in pairs])
    return [Sample(k, tree.path(rel), index[w], w) for k, (rel, w) in zip(keys, pairs)]


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
