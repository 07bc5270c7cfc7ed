"""Real-image statistics of FID (mean and covariance of a feature layer over the real shards), cached in the eval
cache under a key of the shards' content, the extractor and the image size, so a second run reads them back and
changed data never meets old statistics."""

import hashlib
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics
from tqdm import tqdm

from .checkpoint import atomic_save
from .config import INCEPTION, SAMPLE_CLASSIFIER
from .data import ShardSet
from .errors import MetricsError
from .files import load_cached
from .loader import iter_uint8
from .storage import user_cache

# (FID layer, IS layer) per extractor: Inception's pool features and bias-free logits, as torch-fidelity does.
LAYERS = {INCEPTION: ("2048", "logits_unbiased"), SAMPLE_CLASSIFIER: ("features", "logits")}


def statistics(features: torch.Tensor) -> dict:
    """FID statistics {"mu": (D,), "sigma": (D, D)} of features (N, D), as torch-fidelity computes them."""
    return fid_features_to_statistics(features.float().cpu())


def on_device(device: torch.device):
    """A context making `device` current for torch-fidelity, which moves models and noise with .cuda()."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def default_cache_dir(shards: ShardSet) -> Path:
    """<shards root>/cache when the data folder is writable, else $XDG_CACHE_HOME/sagan (~/.cache/sagan)."""
    if not shards.remote and os.access(shards.root, os.W_OK):
        return Path(shards.root) / "cache"
    return user_cache()


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractorBase,
    shards: ShardSet,
    batch_size: int,
    device,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """{layer: (N, D)} features of every real image in `shards`, decoded by `workers` processes (default: up
    to 4, one per core) while the extractor runs."""
    out: dict[str, list] = {name: [] for name in extractor.get_requested_features_list()}
    with tqdm(total=shards.num_samples, unit="img", desc="real features", disable=not progress, leave=False) as bar:
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        for images, _ in iter_uint8(shards, batch_size, workers):
            features = extractor.convert_features_tuple_to_dict(extractor(images.to(device)))
            for name, value in features.items():
                out[name].append(value.cpu())
            bar.update(len(images))
    return {name: torch.cat(values) for name, values in out.items()}


def _save_stats(stats: dict, meta: dict, path: Path) -> None:
    # Tensors and plain values only, so the file loads with weights_only=True (no pickled numpy objects).
    atomic_save({"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"]), **meta}, path)


STATS_KEYS = ("mu", "sigma", "key", "num_samples")


def read_stats_file(path: Path) -> dict:
    """A statistics file a user named (--stats-file), or MetricsError in one line when it is not one."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # nothing in it executes
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, or pickled code: not statistics either way
        raise MetricsError(
            f"--stats-file {path} is not a statistics file ({type(e).__name__}); give a file this tool wrote, "
            "or a path that does not exist yet (it is written there)"
        ) from None
    missing = [k for k in STATS_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise MetricsError(
            f"--stats-file {path} is not a statistics file (it lacks {', '.join(missing)}); give a file this tool "
            "wrote, or a path that does not exist yet (it is written there)"
        )
    return saved


def check_stats_file(stats_file: str | None) -> None:
    """Before any work: an existing --stats-file must be statistics, a new one must be writable where it is."""
    if not stats_file:
        return
    path = Path(stats_file)
    if path.is_dir():
        raise MetricsError(f"--stats-file {path} is a folder; give a file path (it is written when absent)")
    if path.exists():
        read_stats_file(path)
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise MetricsError(
            f"--stats-file {path}: the folder {path.parent} "
            f"{'is not writable' if path.parent.is_dir() else 'does not exist'}; choose another path"
        )


def real_statistics(
    extractor: FeatureExtractorBase,
    identity: str,
    shards: ShardSet,
    cache: Path,
    batch_size: int,
    device,
    stats_file: str | None = None,
    log=print,
) -> dict:
    """FID statistics of the real images in `shards` under `extractor` (whose weights `identity` names).

    Cached in `cache` under a key of the shards' content, the extractor and the image size, so a second
    call makes no feature pass. With `stats_file`, that file is read when it exists (and must match) and
    written otherwise.
    """
    layer = LAYERS[extractor.get_name()][0]
    meta = {
        "extractor": extractor.get_name(),
        "extractor_id": identity,
        "layer": layer,
        "image_size": shards.image_size,
        "data_key": shards.key,
        "version": 2,  # 1: written before the evaluation verified the shards' bytes, possibly of damaged data
    }
    key = hashlib.sha256(repr(sorted(meta.items())).encode()).hexdigest()
    path = (
        Path(stats_file)
        if stats_file
        else Path(cache) / f"fid-stats-{meta['extractor']}-{shards.image_size}px-{key[:16]}.pt"
    )
    if stats_file and path.is_file():
        saved = read_stats_file(path)
    else:
        saved = load_cached(path, log)
    if saved:
        if saved.get("key") != key:
            differs = [k for k in meta if saved.get(k) != meta[k]]
            raise MetricsError(
                f"real statistics {path} were computed with other {', '.join(differs)}; "
                "delete the file or choose another --stats-file"
            )
        log(f"real statistics: {saved['num_samples']} images, cached ({path})")
        return {"mu": saved["mu"].numpy(), "sigma": saved["sigma"].numpy()}
    log(f"real statistics: {shards.num_samples} images through {meta['extractor']} ...")
    features = extract_features(extractor, shards, batch_size, device)[layer]
    stats = statistics(features)
    _save_stats(stats, {**meta, "key": key, "num_samples": len(features), "manifest": shards.manifest}, path)
    log(f"real statistics cached ({path})")
    return stats
