"""Batches from the shards, decoded in background processes, in an order that is a pure function of
(seed, epoch, rank, world size).

A *plan* says which samples make each batch: (shard index, sample index) pairs. The shards are shuffled per
epoch with the same seed on every rank and dealt round-robin (rank k takes shards k, k + world, ...); a rank's
samples are shuffled within groups of SHUFFLE_SHARDS shards. Batches are read by seeking into the tars
(an index of their members is built from the tar headers alone) and decoded by `torch.utils.data.DataLoader`
workers, so the order does not depend on how many workers there are, and a resumed run starts at any batch
without reading, let alone decoding, the ones before it.
"""

import random
import re
import tarfile
import warnings
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .config import SaganConfig
from .data import DataError, ShardSet, _fix, batches_per_epoch

SHUFFLE_SHARDS = 4  # a rank's samples are shuffled within groups of this many shards (~4,000 ImageNet samples)
OPEN_FILES = 64  # tar files a worker keeps open
REMOTE_IN_MEMORY = 2 * SHUFFLE_SHARDS  # shards from object storage a worker holds in memory (no data.cache_dir)
LOOKAHEAD = 32  # batches ahead whose shards are fetched from object storage in the background
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.(.+)$")  # webdataset's rule: the key is the name up to its first dot


def epoch_plan(shards: ShardSet, rank: int, world_size: int, batch_size: int, epoch: int, seed: int) -> np.ndarray:
    """This rank's batches in epoch `epoch`: (batches_per_epoch, B, 2) int64 of (shard index, sample index)."""
    counts, n_batches = shards.counts, batches_per_epoch(shards, world_size, batch_size)
    order = list(range(len(counts)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    mine = order[: len(order) // world_size * world_size][rank::world_size]
    rng = np.random.default_rng([seed, epoch, rank])
    refs = []
    for g in range(0, len(mine), SHUFFLE_SHARDS):
        group = [np.stack([np.full(counts[s], s), np.arange(counts[s])], axis=1) for s in mine[g : g + SHUFFLE_SHARDS]]
        pairs = np.concatenate(group)
        refs.append(pairs[rng.permutation(len(pairs))])
    return np.concatenate(refs)[: n_batches * batch_size].reshape(n_batches, batch_size, 2)


def tar_index(url: str, expected: int | None = None, file=None) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of the tar at `url` (read from `file`, a seekable binary file, when given) in order:
    (key, {extension: (data offset, size)}), from its headers only. DataError naming the tar when it cannot be read
    or holds another number of samples than `expected`."""
    samples: list[tuple[str, dict]] = []
    if file is not None:
        file.seek(0)
    try:
        with tarfile.open(url if file is None else None, "r:", fileobj=file) as tar:
            for member in tar:
                match = _KEY.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, ext = match.groups()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (EOFError, tarfile.TarError) as e:  # the content; an OSError of the storage propagates (Ray retries it)
        after = f"after sample {samples[-1][0]}" if samples else "before its first sample"
        raise DataError(f"shard {url}: {after}: {type(e).__name__}: {_one_line(e)}; {_fix(url)}") from None
    if expected is not None and len(samples) != expected:
        raise DataError(
            f"shard {url}: holds {len(samples)} samples, the manifest says {expected} (cut short?); {_fix(url)}"
        )
    return samples


def compact_index(url: str, expected: int | None = None, file=None) -> np.ndarray:
    """`tar_index` as (N, 4) int64: jpg offset, jpg size, cls offset, cls size (-1 for a missing member).
    32 bytes per sample: a worker keeps the index of every shard it reads (ImageNet: ~41 MB in all)."""
    index = np.full((len(samples := tar_index(url, expected, file)), 4), -1, dtype=np.int64)
    for i, (_, members) in enumerate(samples):
        for col, ext in ((0, "jpg"), (2, "cls")):
            if ext in members:
                index[i, col : col + 2] = members[ext]
    return index


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decode_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> (3, H, W) uint8, with libjpeg-turbo through torchvision: 1.5x PIL + numpy here
    (benchmarks/loader_speed.py). torchvision is imported here, at the first decode: importing it pulls in
    torch._dynamo (about 1 s), which the processes that only unpickle the training loop (Ray Train's controller,
    a Tune trial's actor) never need."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec, on every call
        return _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def loader_workers(cfg: SaganConfig, cpus: float) -> int:
    """Decoding processes per rank: data.loader_workers, else the rank's `cpus` (at least 1)."""
    return cfg.data.loader_workers if cfg.data.loader_workers is not None else max(1, int(cpus))


class ShardReader:
    """Random access to the samples of a ShardSet: tar indexes built on first use, files kept open. Shards on
    object storage are read whole (sagan.shard_cache), the next ones downloaded while these are decoded."""

    def __init__(self, shards: ShardSet, span: int = 1):
        """`span`: how many ranks' batches each batch holds (an elastic worker's virtual ranks): each reads its
        own group of shards, so that many times the shards are kept."""
        self.shards = shards
        self.indexes: dict[int, np.ndarray] = {}
        self.files: OrderedDict = OrderedDict()
        self.remote, self.max_open = None, OPEN_FILES * span
        if shards.remote:
            from .shard_cache import RemoteShards

            keep = REMOTE_IN_MEMORY * span  # fewer, and every batch would download its shards again
            self.remote = RemoteShards(shards, shards.cache_dir, shards.cache_bytes, keep=keep)
            self.max_open = keep  # an open cached file keeps its disk space after a trim removes it

    def _file(self, shard: int):
        f = self.files.pop(shard, None)
        if f is None:
            f = self.remote.open(shard) if self.remote else open(self.shards.urls[shard], "rb")
        self.files[shard] = f  # most recently used last
        if len(self.files) > self.max_open:
            self.files.popitem(last=False)[1].close()
        return f

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._file(shard)
        f.seek(offset)
        return f.read(size)

    def prefetch(self, shards) -> None:
        """Start fetching `shards` from object storage (nothing for shards on a disk)."""
        if self.remote:
            self.remote.prefetch(s for s in shards if s not in self.files)

    def sample(self, shard: int, i: int) -> tuple[torch.Tensor, int]:
        """(image (3, R, R) uint8, label) of sample `i` of shard `shard`. DataError, one line naming the shard
        and the sample's key, for what is wrong with the shard's content; an OSError of the storage propagates."""
        url = self.shards.urls[shard]
        if shard not in self.indexes:
            self.indexes[shard] = compact_index(url, self.shards.counts[shard], self._file(shard))
        jpg_at, jpg_size, cls_at, cls_size = (int(v) for v in self.indexes[shard][i])
        problem = "no .jpg member" if jpg_at < 0 else "no .cls member" if cls_at < 0 else None
        if problem is None:
            jpg, cls = self._read(shard, jpg_at, jpg_size), self._read(shard, cls_at, cls_size)
            if len(jpg) != jpg_size or len(cls) != cls_size:
                problem = "the file ends inside the sample (cut short?)"
            else:
                try:
                    image, label = decode_jpeg(jpg), int(cls)
                except (RuntimeError, ValueError) as e:  # torchvision's decode errors are RuntimeErrors
                    problem = f"{type(e).__name__}: {_one_line(e)}"
        if problem is None:
            size = self.shards.image_size
            if size and tuple(image.shape) != (3, size, size):
                problem = f"image of shape {tuple(image.shape)}, the manifest says {size}px (shards of another --size?)"
            elif self.shards.num_classes and not 0 <= label < self.shards.num_classes:
                problem = f"label {label} outside 0..{self.shards.num_classes - 1}"
        if problem is not None:
            key = tar_index(url, file=self._file(shard))[i][0]  # names are not in the compact index: read again
            raise DataError(f"shard {url}: sample {key}: {problem}; {_fix(url)}")
        return image, label

    def batch(self, refs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, R, R) uint8, labels (B,) int64) of the (shard, sample) pairs `refs` (B, 2)."""
        pairs = [self.sample(int(s), int(i)) for s, i in refs]
        return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.long)


class Batches(Dataset):
    """Batch number g as (uint8 images, labels), read from the shards by the process that asks (a DataLoader
    worker). A read error comes back as its message (a str), so the caller raises it once, as one line."""

    span = 1  # ranks whose batches one batch holds

    def __init__(self, shards: ShardSet):
        self.shards = shards
        self.reader: ShardReader | None = None  # made in the worker process: open files do not cross a fork

    def refs(self, g: int) -> np.ndarray:
        """The (shard, sample) pairs (B, 2) of batch `g`."""
        raise NotImplementedError

    def upcoming(self, g: int, stride: int = 1) -> list[int]:
        """The shards that this process's next batches after `g` read (g + stride, g + 2 stride, ..., within
        LOOKAHEAD batches of the schedule), in the order they are first needed."""
        return []

    def __getitem__(self, g: int):
        self.reader = self.reader or ShardReader(self.shards, self.span)
        try:
            refs = self.refs(g)
            worker = get_worker_info()  # a DataLoader worker gets every num_workers-th batch: look ahead over its own
            self.reader.prefetch(self.upcoming(g, worker.num_workers if worker else 1))
            return self.reader.batch(refs)
        except DataError as e:
            return str(e)


class PlannedBatches(Batches):
    """A worker's endless schedule: batch g is batch g % batches_per_epoch of epoch g // batches_per_epoch of each
    of `ranks` (ranks of a world of `world_size`), concatenated in rank order. One rank per worker is plain data
    parallelism; several are the virtual ranks an elastic run's worker serves (`serving`)."""

    def __init__(self, shards: ShardSet, ranks: int | tuple[int, ...], world_size: int, batch_size: int, seed: int):
        super().__init__(shards)
        self.ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
        self.span = len(self.ranks)
        self.world, self.batch_size, self.seed = world_size, batch_size, seed
        self.per_epoch = batches_per_epoch(shards, world_size, batch_size)
        self.plan: tuple[int, np.ndarray] | None = None  # the current epoch's (B x ranks), made once per process

    def refs(self, g: int) -> np.ndarray:
        epoch, b = divmod(g, self.per_epoch)
        if self.plan is None or self.plan[0] != epoch:
            plans = [epoch_plan(self.shards, r, self.world, self.batch_size, epoch, self.seed) for r in self.ranks]
            self.plan = (epoch, np.concatenate(plans, axis=1))
        return self.plan[1][b]

    def upcoming(self, g: int, stride: int = 1) -> list[int]:
        b = g % self.per_epoch
        return _first_seen(self.plan[1][b + stride : b + 1 + LOOKAHEAD : stride, :, 0])


def serving(rank: int, world: int, virtual: int) -> tuple[int, ...]:
    """The virtual ranks worker `rank` of `world` serves when the data is planned for `virtual` ranks: rank,
    rank + world, ... Every virtual rank has one worker at any world size from 1 to `virtual`."""
    if not 1 <= world <= virtual:
        raise ValueError(f"{world} workers cannot serve {virtual} virtual ranks (1 to {virtual} can)")
    return tuple(range(rank, virtual, world))


class SequentialBatches(Batches):
    """Every sample once, in shard order, in batches of `batch_size` (the last one smaller): real statistics."""

    def __init__(self, shards: ShardSet, batch_size: int):
        super().__init__(shards)
        refs = np.concatenate([np.stack([np.full(c, s), np.arange(c)], axis=1) for s, c in enumerate(shards.counts)])
        self.all = [refs[i : i + batch_size] for i in range(0, len(refs), batch_size)]

    def __len__(self) -> int:
        return len(self.all)

    def refs(self, g: int) -> np.ndarray:
        return self.all[g]

    def upcoming(self, g: int, stride: int = 1) -> list[int]:
        ahead = self.all[g + stride : g + 1 + LOOKAHEAD : stride]
        return _first_seen(np.concatenate(ahead or [np.zeros((0, 2), np.int64)])[:, 0])


def _first_seen(shards: np.ndarray) -> list[int]:
    """The distinct values of `shards` in the order they first occur."""
    values, first = np.unique(shards.reshape(-1), return_index=True)
    return [int(v) for v in values[np.argsort(first)]]


def load(dataset: Batches, start: int, stop: int, workers: int = 0, prefetch: int = 2, pin: bool = False):
    """Batches number start..stop-1 of `dataset`, in order, from `workers` processes (0: this one) reading
    `prefetch` batches ahead each; pinned for a fast copy to a GPU when `pin`. Raises DataError, one line."""
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG that latents come from.
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
        generator=torch.Generator(),
    )
    for item in loader:
        if isinstance(item, str):
            raise DataError(item)
        yield item


def rank_loader(
    shards: ShardSet,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    start_batch: int,
    workers: int = 0,
    prefetch: int = 2,
    pin: bool = False,
    virtual: int | None = None,
):
    """Endless uint8 batches of this rank's schedule from batch `start_batch` on (epoch after epoch). With
    `virtual` (an elastic run), the data is planned for that many ranks whatever `world_size` is, and each batch
    holds this worker's virtual ranks' batches one after the other (batch_size each)."""
    ranks = serving(rank, world_size, virtual) if virtual else (rank,)
    plan = PlannedBatches(shards, ranks, virtual or world_size, batch_size, seed)
    return load(plan, start_batch, 2**62, workers, prefetch, pin)


def rank_batches(shards: ShardSet, rank: int, world_size: int, batch_size: int, epoch: int, seed: int = 0):
    """Exactly `batches_per_epoch(...)` batches of (images (B, 3, R, R) in [-1, 1], labels (B,)): this rank's
    share of epoch `epoch`, read in this process."""
    dataset = PlannedBatches(shards, rank, world_size, batch_size, seed)
    for x, y in load(dataset, epoch * dataset.per_epoch, (epoch + 1) * dataset.per_epoch):
        yield x.float().div_(127.5).sub_(1.0), y


def iter_uint8(shards: ShardSet, batch_size: int, workers: int = 0):
    """Every sample of `shards` once, in shard order: (images (B, 3, R, R) uint8, labels (B,)) batches."""
    dataset = SequentialBatches(shards, batch_size)
    yield from load(dataset, 0, len(dataset), workers)
