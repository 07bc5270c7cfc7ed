"""FID, IS and class accuracy of a generator through torch-fidelity, with real statistics cached by content.

Two feature extractors, both registered with torch-fidelity:
- `inception-v3-compat`: torch-fidelity's TF-ported Inception v3, the standard for ImageNet; its weights file is
  found, downloaded and checked by `sagan.inception`.
- `sample-classifier`: a small CNN trained on the built-in sample set (`sagan.sample_classifier`), since the
  Inception weights cannot be downloaded offline; it adds class accuracy to FID and IS.
The real images' statistics are computed once and cached by content (`sagan.real_stats`).

`build_evaluator(cfg, device)` resolves the extractor and the real statistics once; the returned `Evaluator`
scores any generator, in the training loop (few samples, fast) and in the evaluation job (50k samples).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.generative_model_base import GenerativeModelBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_generative_model

from . import cache_mirror, inception
from .config import INCEPTION, SAMPLE_CLASSIFIER, SaganConfig
from .data import DataError, ShardSet, find_shards, sha256_mismatch, size_mismatch, with_cache
from .errors import MetricsError
from .files import copy_into, sha256_file
from .real_stats import LAYERS, default_cache_dir, on_device, real_statistics, statistics
from .sample_classifier import accuracy, sample_classifier
from .storage import is_url

ISC_SPLITS = 10  # the standard Inception Score protocol (Salimans et al. 2016)


def fid(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two sets of FID statistics."""
    return fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = ISC_SPLITS, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the Inception Score of `logits` (N, C) over `splits` shuffled splits."""
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def balanced_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """(N,) class labels, as equal in count as N allows, in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]


class _ConditionalSampler(GenerativeModelBase):
    """G with its own labels, consumed in order. torch-fidelity 0.4's own label sampling calls np.int, which
    NumPy >= 1.24 removed, so the sampler presents itself as unconditional (num_classes = 0)."""

    def __init__(self, G: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.G, self.labels, self.pos = G, labels, 0

    @property
    def z_size(self):
        return self.G.z_dim

    @property
    def z_type(self):
        return "normal"

    @property
    def num_classes(self):
        return 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.labels[self.pos : self.pos + len(z)].to(z.device)
        self.pos += len(z)
        x = self.G(z, y)
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # quantised like real images


@dataclass
class Evaluator:
    """Scores generators against one set of real statistics; see `build_evaluator`."""

    extractor: FeatureExtractorBase
    real: dict
    num_classes: int
    batch_size: int
    device: torch.device
    seed: int = 0

    @torch.no_grad()
    def __call__(self, G: nn.Module, num_samples: int, progress: bool = False) -> dict[str, float]:
        """{"fid", "is", "is_std"} (plus "class_acc" with the sample classifier) of `num_samples` images of G,
        classes balanced; the same latents and labels on every call, so scores are comparable across steps."""
        if num_samples < ISC_SPLITS:
            raise MetricsError(f"{num_samples} samples cannot make {ISC_SPLITS} IS splits; use at least {ISC_SPLITS}")
        fid_layer, isc_layer = LAYERS[self.extractor.get_name()]
        labels = balanced_labels(num_samples, self.num_classes, self.seed)
        was_training = G.training
        G.eval()
        try:
            with on_device(self.device):
                features = get_featuresdict_from_generative_model(
                    _ConditionalSampler(G, labels),
                    self.extractor,
                    num_samples,
                    self.batch_size,
                    cuda=self.device.type == "cuda",
                    rng_seed=self.seed,
                    verbose=progress,
                )
        finally:
            G.train(was_training)
        is_mean, is_std = inception_score(features[isc_layer], ISC_SPLITS, self.seed)
        out = {"fid": fid(statistics(features[fid_layer]), self.real), "is": is_mean, "is_std": is_std}
        if self.extractor.get_name() == SAMPLE_CLASSIFIER:
            out["class_acc"] = accuracy(features["logits"], labels)
        return out


def eval_cache_dir(cfg: SaganConfig) -> Path:
    """eval.cache_dir, else the default next to the real shards (see `default_cache_dir`). On object storage:
    its local mirror, with the bucket's files pulled (sagan.cache_mirror); `publish_cache` uploads new ones."""
    if is_url(cfg.eval.cache_dir):  # the other extractor's weights are not fetched
        other = "sample-classifier-*" if cfg.eval.feature_extractor == INCEPTION else inception.INCEPTION_FILE
        return cache_mirror.pull(cfg.eval.cache_dir, skip=(other,))
    return Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else default_cache_dir(real_shards(cfg))


def publish_cache(cfg: SaganConfig) -> None:
    """What this process added to an eval.cache_dir on object storage, uploaded for every other node."""
    if is_url(cfg.eval.cache_dir):
        cache_mirror.push(cfg.eval.cache_dir)


def feature_weights(cfg: SaganConfig, log=print) -> tuple[Path, str]:
    """(weights file in the eval cache, identity for cache keys) of cfg.eval.feature_extractor: the Inception
    file found in the cache, given, or downloaded, and copied into the cache (so every node sharing it finds
    it), or the sample classifier, trained if it is not cached. Raises MetricsError when the weights cannot be
    had."""
    e, cache = cfg.eval, eval_cache_dir(cfg)
    if e.feature_extractor == INCEPTION:
        cached = cache / inception.INCEPTION_FILE  # the same bytes as a given file: it is checked by sha256
        weights = copy_into(
            inception.inception_weights(str(cached) if cached.is_file() else e.inception_weights), cache
        )
        publish_cache(cfg)
        return weights, inception.INCEPTION_SHA256_PREFIX
    try:
        train, val = find_shards(cfg.data.train_shards, "train"), find_shards(cfg.data.val_shards, "val")
    except DataError as err:
        raise MetricsError(f"the sample classifier needs the sample set's shards: {err}") from None
    path = sample_classifier(train, val, cache, log)
    publish_cache(cfg)
    return path, sha256_file(path)


def real_shards(cfg: SaganConfig) -> ShardSet:
    """The real images FID compares against: data.val_shards or data.train_shards (eval.real_split),
    checked against the model's classes and resolution."""
    split = cfg.eval.real_split
    location = cfg.data.val_shards if split == "val" else cfg.data.train_shards
    try:
        shards = with_cache(find_shards(location, split), cfg.data)
    except DataError as err:
        raise MetricsError(f"real images for FID (data.{split}_shards): {err}") from None
    m = cfg.model
    if (shards.num_classes, shards.image_size) != (m.num_classes, m.resolution):
        raise MetricsError(
            f"real images for FID ({shards.root}) hold {shards.num_classes} classes at "
            f"{shards.image_size}px but the model makes {m.num_classes} at {m.resolution}px; "
            f"point data.{split}_shards at the data the model was trained on"
        )
    return shards


def verified_real_shards(cfg: SaganConfig) -> ShardSet:
    """`real_shards(cfg)` whose bytes are checked against their manifest as data.verify says (size: a stat per
    shard; full: their sha256 too). The statistics of the real images are cached under the manifest's hashes, so
    only data that matches them may be summarised or looked up: a shard altered in place would otherwise score
    against (or cache) statistics of other bytes."""
    shards = real_shards(cfg)
    problem = size_mismatch(shards) if cfg.data.verify != "off" else None
    if problem is None and cfg.data.verify == "full":
        problem = sha256_mismatch(shards.urls, shards.sha256s)
    if problem:
        raise MetricsError(f"real images for FID (data.{cfg.eval.real_split}_shards): {problem}")
    return shards


def build_evaluator(
    cfg: SaganConfig, device, stats_file: str | None = None, weights: tuple[Path, str] | None = None, log=print
) -> Evaluator:
    """An Evaluator for cfg.eval's extractor against eval.real_split's statistics (cached or computed now).
    `weights`: what `feature_weights(cfg)` returned, when the caller has it already."""
    device = torch.device(device)
    shards = real_shards(cfg)
    weights, identity = weights or feature_weights(cfg, log)
    with on_device(device):
        extractor = create_feature_extractor(
            cfg.eval.feature_extractor,
            list(LAYERS[cfg.eval.feature_extractor]),
            cuda=device.type == "cuda",
            feature_extractor_weights_path=str(weights),
            verbose=False,
        )
        real = real_statistics(
            extractor, identity, shards, eval_cache_dir(cfg), cfg.eval.batch_size, device, stats_file, log
        )
    publish_cache(cfg)
    return Evaluator(extractor, real, cfg.model.num_classes, cfg.eval.batch_size, device, cfg.eval.seed)
