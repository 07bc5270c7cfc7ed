"""FID, IS and class accuracy of a generator through torch-fidelity, with real statistics cached by content.

Two feature extractors, both registered with torch-fidelity:
- `inception-v3-compat`: torch-fidelity's TF-ported Inception v3, the standard for ImageNet. Its weights come
  from a local file or are downloaded once into $TORCH_HOME/hub/checkpoints; the file's hash is checked
  before torch-fidelity reads it (it unpickles that file without `weights_only`).
- `sample-classifier`: a small CNN trained on the built-in sample set's train split (the Inception weights
  cannot be downloaded offline). FID from its pooled features, IS from its logits, and class accuracy: the
  share of conditional samples it classifies as the class they were generated for.

`build_evaluator(cfg, device)` resolves the extractor and the real statistics once; the returned `Evaluator`
scores any generator, in the training loop (few samples, fast) and in the evaluation job (50k samples).
"""

import hashlib
import os
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.generative_model_base import GenerativeModelBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_generative_model
from tqdm import tqdm

from .checkpoint import atomic_save
from .config import INCEPTION, SAMPLE_CLASSIFIER, Config
from .data import DataError, ShardSet, find_shards
from .errors import UserError
from .files import atomic_output
from .loader import iter_uint8

ISC_SPLITS = 10  # the standard Inception Score protocol (Salimans et al. 2016)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its sha256 prefix
INCEPTION_URL = URL_INCEPTION_V3
# (FID layer, IS layer) per extractor: Inception's pool features and bias-free logits, as torch-fidelity does.
LAYERS = {INCEPTION: ("2048", "logits_unbiased"), SAMPLE_CLASSIFIER: ("features", "logits")}


class MetricsError(UserError, RuntimeError):
    """Evaluation cannot start (weights, data or statistics missing or mismatched); the message says the fix."""


# ---------------------------------------------------------------- Inception weights


def inception_weights(path: str | None = None, download: bool = True, timeout: float = 30.0) -> Path:
    """The official Inception weights file: `path`, else $TORCH_HOME/hub/checkpoints/<file>, else downloaded
    there. Raises MetricsError (saying how to provide the file) when there is none and no network."""
    if path:
        found = Path(path).expanduser()
        if not found.is_file():
            raise MetricsError(f"Inception weights {found} do not exist; pass the path of {INCEPTION_FILE}")
        _check_sha256(found)
        return found
    home = Path(torch.hub.get_dir()) / "checkpoints"
    found = home / INCEPTION_FILE
    if found.is_file():
        _check_sha256(found)
        return found
    if download:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # an offline cluster with a black-holed route must not hang here
        try:
            home.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                INCEPTION_URL, str(found), hash_prefix=INCEPTION_SHA256_PREFIX, progress=True
            )
            return found
        except Exception as e:  # noqa: BLE001 - any download failure has the same fix
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        finally:
            socket.setdefaulttimeout(old)
    else:
        reason = "downloads disabled"
    raise MetricsError(
        f"no Inception weights: none given, none at {found}, and the download from {INCEPTION_URL} "
        f"failed ({reason}); fetch {INCEPTION_FILE} where there is internet and pass "
        f"--inception-weights PATH (or eval.inception_weights=PATH), or copy it to {home}/"
    )


def _check_sha256(path: Path) -> None:
    digest = _sha256(path)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise MetricsError(
            f"{path} is not {INCEPTION_FILE} (sha256 {digest[:8]}..., expected {INCEPTION_SHA256_PREFIX}...); "
            "FID/IS are only comparable with the standard weights"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _share(path: Path, cache: Path) -> Path:
    """`path` copied into `cache` (atomically, once), where every node sharing the cache finds it."""
    target = Path(cache) / path.name
    if target.is_file() and target.stat().st_size == path.stat().st_size:
        return target
    with atomic_output(target) as tmp:
        shutil.copyfile(path, tmp)
    return target


def _on(device: torch.device):
    """A context making `device` current for torch-fidelity, which moves models and noise with .cuda()."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _load_cached(path: Path, log) -> dict | None:
    """The dict torch saved at `path`, or None (a miss) when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, whatever the damage
        log(f"cache entry {path} is unreadable ({type(e).__name__}); recomputing it")
        return None


# ---------------------------------------------------------------- the sample-set classifier


class SampleClassifier(nn.Module):
    """Small CNN for the built-in sample set: (B, 3, R, R) in [-1, 1] -> (features (B, 4*width), logits (B, C)).

    Shaped like Inception for FID's sake: globally average-pooled conv features, then one linear layer.
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


class SampleClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity's view of a trained SampleClassifier: uint8 (B, 3, R, R) -> features and logits."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise MetricsError(
                "the sample classifier needs its weights file (sagan.metrics.sample_classifier makes it)"
            )
        saved = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = SampleClassifier(saved["num_classes"], saved["width"])
        self.net.load_state_dict(saved["state_dict"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        features, logits = self.net(x.float() / 127.5 - 1.0)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


if SAMPLE_CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(SAMPLE_CLASSIFIER, SampleClassifierFeatures)


def load_images(shards: ShardSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `shards` in memory: (N, 3, R, R) uint8 and labels (N,). For small sets only."""
    batches = list(iter_uint8(shards, 1024))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """The batch moved by one random offset of up to `max_shift` pixels, black-padded: robustness to a
    generator's small offsets."""
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    size = x.shape[-1]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[..., dy : dy + size, dx : dx + size]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows of `logits` (N, C) whose argmax is the label (N,)."""
    return (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()


# How the sample classifier is trained; part of its cache key, so a changed recipe retrains it.
# 10 epochs of width 32: 98.9% val accuracy in ~15 s on 2 cores (width 16: 97.8%).
CLASSIFIER_RECIPE = {"epochs": 10, "width": 32, "seed": 0, "batch_size": 64}


def train_sample_classifier(
    train: ShardSet, val: ShardSet, epochs: int, width: int, seed: int, batch_size: int
) -> tuple[dict, float]:
    """Train a SampleClassifier on `train`; return (what SampleClassifierFeatures loads, val accuracy)."""
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's random state
        torch.manual_seed(seed)
        net = SampleClassifier(train.num_classes, width)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_images(train)
    x_val, y_val = load_images(val)
    x_train = x_train.float() / 127.5 - 1.0
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * -(-len(x_train) // batch_size))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            _, logits = net(_shift(x_train[idx], 2, gen))
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        _, logits = net(x_val.float() / 127.5 - 1.0)
    saved = {
        "state_dict": net.state_dict(),
        "num_classes": train.num_classes,
        "width": width,
        "image_size": train.image_size,
        "train_key": train.key,
        "val_key": val.key,
    }
    return saved, accuracy(logits, y_val)


def sample_classifier(train: ShardSet, val: ShardSet, cache: Path, log=print) -> Path:
    """The classifier's weights file for these shards: from `cache`, or trained now and cached there."""
    key = hashlib.sha256(f"{train.key} {sorted(CLASSIFIER_RECIPE.items())}".encode()).hexdigest()
    path = Path(cache) / f"sample-classifier-{key[:16]}.pt"
    saved = _load_cached(path, log)
    if saved and saved.get("key") == key:
        log(f"sample classifier: val accuracy {saved['val_accuracy']:.1%} ({path})")
        return path
    start = time.perf_counter()
    log(f"training the sample classifier on {train.num_samples} images ...")
    saved, val_accuracy = train_sample_classifier(train, val, **CLASSIFIER_RECIPE)
    saved.update(val_accuracy=val_accuracy, key=key)
    atomic_save(saved, path)
    log(
        f"sample classifier: val accuracy {val_accuracy:.1%} on {val.num_samples} images, "
        f"trained in {time.perf_counter() - start:.0f}s ({path})"
    )
    return path


# ---------------------------------------------------------------- statistics and scores


def statistics(features: torch.Tensor) -> dict:
    """FID statistics {"mu": (D,), "sigma": (D, D)} of features (N, D), as torch-fidelity computes them."""
    return fid_features_to_statistics(features.float().cpu())


def fid(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two sets of FID statistics."""
    return fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = ISC_SPLITS, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the Inception Score of `logits` (N, C) over `splits` shuffled splits."""
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def default_cache_dir(shards: ShardSet) -> Path:
    """<shards root>/cache when the data folder is writable, else $XDG_CACHE_HOME/sagan (~/.cache/sagan)."""
    root = shards.manifest.parent
    if os.access(root, os.W_OK):
        return root / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sagan"


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
    }
    key = hashlib.sha256(repr(sorted(meta.items())).encode()).hexdigest()
    path = (
        Path(stats_file)
        if stats_file
        else Path(cache) / f"fid-stats-{meta['extractor']}-{shards.image_size}px-{key[:16]}.pt"
    )
    if stats_file and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)  # the user's file: errors are theirs to see
    else:
        saved = _load_cached(path, log)
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
    _save_stats(stats, {**meta, "key": key, "num_samples": len(features), "manifest": str(shards.manifest)}, path)
    log(f"real statistics cached ({path})")
    return stats


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
            with _on(self.device):
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


def eval_cache_dir(cfg: Config) -> Path:
    """eval.cache_dir, else the default next to the real shards (see `default_cache_dir`)."""
    return Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else default_cache_dir(real_shards(cfg))


def feature_weights(cfg: Config, log=print) -> tuple[Path, str]:
    """(weights file in the eval cache, identity for cache keys) of cfg.eval.feature_extractor: the Inception
    file found or downloaded and copied into the cache (so every node sharing it finds it), or the sample
    classifier, trained if it is not cached. Raises MetricsError when the weights cannot be had."""
    e = cfg.eval
    if e.feature_extractor == INCEPTION:
        return _share(inception_weights(e.inception_weights), eval_cache_dir(cfg)), INCEPTION_SHA256_PREFIX
    try:
        train, val = find_shards(cfg.data.train_shards, "train"), find_shards(cfg.data.val_shards, "val")
    except DataError as err:
        raise MetricsError(f"the sample classifier needs the sample set's shards: {err}") from None
    path = sample_classifier(train, val, eval_cache_dir(cfg), log)
    return path, _sha256(path)


def real_shards(cfg: Config) -> ShardSet:
    """The real images FID compares against: data.val_shards or data.train_shards (eval.real_split),
    checked against the model's classes and resolution."""
    split = cfg.eval.real_split
    location = cfg.data.val_shards if split == "val" else cfg.data.train_shards
    try:
        shards = find_shards(location, split)
    except DataError as err:
        raise MetricsError(f"real images for FID (data.{split}_shards): {err}") from None
    m = cfg.model
    if (shards.num_classes, shards.image_size) != (m.num_classes, m.resolution):
        raise MetricsError(
            f"real images for FID ({shards.manifest.parent}) hold {shards.num_classes} classes at "
            f"{shards.image_size}px but the model makes {m.num_classes} at {m.resolution}px; "
            f"point data.{split}_shards at the data the model was trained on"
        )
    return shards


def build_evaluator(
    cfg: Config, device, stats_file: str | None = None, weights: tuple[Path, str] | None = None, log=print
) -> Evaluator:
    """An Evaluator for cfg.eval's extractor against eval.real_split's statistics (cached or computed now).
    `weights`: what `feature_weights(cfg)` returned, when the caller has it already."""
    device = torch.device(device)
    shards = real_shards(cfg)
    weights, identity = weights or feature_weights(cfg, log)
    with _on(device):
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
    return Evaluator(extractor, real, cfg.model.num_classes, cfg.eval.batch_size, device, cfg.eval.seed)
