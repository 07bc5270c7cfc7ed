"""The sample-set classifier: a small CNN trained on the built-in sample set's train split, the feature extractor
of FID and IS for the digits (the Inception weights cannot be downloaded offline), registered with torch-fidelity
as `sample-classifier`. FID from its pooled features, IS from its logits, and class accuracy: the share of
conditional samples it classifies as the class they were generated for. Trained once per content of the train
shards and recipe, and cached."""

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .checkpoint import atomic_save
from .config import SAMPLE_CLASSIFIER
from .data import ShardSet
from .errors import MetricsError
from .files import load_cached
from .loader import iter_uint8


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
                "the sample classifier needs its weights file (sagan.sample_classifier.sample_classifier makes it)"
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
    saved = load_cached(path, log)
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
