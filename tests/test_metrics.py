"""FID, IS and class accuracy through torch-fidelity: the small sample-set extractor, cached statistics,
the Inception weights' offline path. No Ray."""

import math
import socket

import pytest
import torch
from torch_fidelity.utils import create_feature_extractor

import sagan.inception as inception
import sagan.metrics as metrics
import sagan.real_stats as real_stats
import sagan.sample_classifier as classifier_module
from pipelines.common.config import load_config
from sagan.data import find_shards
from sagan.inception import inception_weights
from sagan.loader import iter_uint8
from sagan.metrics import Evaluator, MetricsError, balanced_labels, build_evaluator, fid, inception_score
from sagan.models import build_models
from sagan.real_stats import extract_features, real_statistics, statistics
from sagan.sample_classifier import sample_classifier


def sample_cfg(digits, eval_cache, *overrides):
    return load_config(
        None,
        [
            f"data.train_shards={digits / 'train'}",
            f"data.val_shards={digits / 'val'}",
            f"eval.cache_dir={eval_cache}",
            "eval.feature_extractor=sample-classifier",
            "eval.batch_size=128",
            "model.ch=8",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def classifier(digits, eval_cache):
    """(torch-fidelity extractor of the trained sample classifier, its weights file, the val shards)."""
    train, val = find_shards(str(digits / "train")), find_shards(str(digits / "val"), "val")
    path = sample_classifier(train, val, eval_cache, log=lambda m: None)
    extractor = create_feature_extractor(
        "sample-classifier", ["features", "logits"], cuda=False, feature_extractor_weights_path=str(path), verbose=False
    )
    return extractor, path, val


def test_sample_classifier_is_accurate_and_trained_once(digits, eval_cache, classifier, monkeypatch):
    _, path, val = classifier
    saved = torch.load(path, weights_only=True)
    assert saved["val_accuracy"] > 0.95 and saved["num_classes"] == 10
    monkeypatch.setattr(classifier_module, "train_sample_classifier", lambda *a, **k: pytest.fail("retrained"))
    lines = []
    train = find_shards(str(digits / "train"))
    assert sample_classifier(train, val, eval_cache, log=lines.append) == path
    assert "val accuracy" in lines[0]


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise_and_shifts(classifier):
    extractor, _, val = classifier
    images = torch.cat([b[0] for b in iter_uint8(val, 128)])
    real = statistics(extractor(images)[0])
    gen = torch.Generator().manual_seed(0)
    noisy = (images.float() + 40 * torch.randn(images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    shifted = torch.roll(images, shifts=(5, 5), dims=(2, 3))
    same, noise, shift = (
        fid(real, real),
        fid(statistics(extractor(noisy)[0]), real),
        fid(statistics(extractor(shifted)[0]), real),
    )
    assert abs(same) < 1e-3
    assert noise > 1.0 and shift > 1.0
    assert noise > 1000 * abs(same) and shift > 1000 * abs(same)


def test_is_of_confident_class_balanced_logits_equals_the_number_of_classes():
    labels = balanced_labels(20000, 10)
    logits = 50.0 * torch.nn.functional.one_hot(labels, 10).float()
    assert inception_score(logits, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    mean, std = inception_score(logits, splits=10)  # 2,000 per split: balanced up to sampling noise
    assert mean == pytest.approx(10.0, rel=0.01) and std < 0.05


def test_is_of_uniform_logits_is_one():
    assert inception_score(torch.zeros(1000, 10))[0] == pytest.approx(1.0, abs=1e-9)


def test_balanced_labels_cover_every_class_equally_in_seeded_order():
    a, b = balanced_labels(1000, 10, seed=3), balanced_labels(1000, 10, seed=3)
    assert torch.equal(a, b) and torch.bincount(a).tolist() == [100] * 10
    assert not torch.equal(a[:10], torch.arange(10))


def test_real_statistics_are_cached_and_the_second_call_makes_no_feature_pass(classifier, tmp_path, monkeypatch):
    extractor, path, val = classifier
    first = real_statistics(extractor, "id-1", val, tmp_path, 128, "cpu", log=lambda m: None)
    (cached,) = tmp_path.glob("fid-stats-sample-classifier-32px-*.pt")
    assert set(torch.load(cached, weights_only=True)) >= {"mu", "sigma", "key", "data_key", "num_samples"}
    monkeypatch.setattr(real_stats, "extract_features", lambda *a, **k: pytest.fail("feature pass on a cache hit"))
    second = real_statistics(extractor, "id-1", val, tmp_path, 128, "cpu", log=lambda m: None)
    assert (first["mu"] == second["mu"]).all() and (first["sigma"] == second["sigma"]).all()
    assert first["mu"].dtype == second["mu"].dtype  # torch-fidelity's FID insists on equal dtypes


def test_a_damaged_cache_entry_is_recomputed(classifier, tmp_path):
    extractor, _, val = classifier
    first = real_statistics(extractor, "id-1", val, tmp_path, 128, "cpu", log=lambda m: None)
    (cached,) = tmp_path.glob("fid-stats-*.pt")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a crash on another node
    lines = []
    again = real_statistics(extractor, "id-1", val, tmp_path, 128, "cpu", log=lines.append)
    assert any("unreadable" in line for line in lines)
    assert (first["sigma"] == again["sigma"]).all()
    torch.load(cached, weights_only=True)  # rewritten whole


def test_cache_key_changes_with_the_extractor_weights(classifier, tmp_path):
    extractor, _, val = classifier
    real_statistics(extractor, "weights-a", val, tmp_path, 128, "cpu", log=lambda m: None)
    real_statistics(extractor, "weights-b", val, tmp_path, 128, "cpu", log=lambda m: None)
    assert len(list(tmp_path.glob("fid-stats-*.pt"))) == 2


def test_explicit_stats_file_is_written_then_read_and_must_match(classifier, tmp_path, monkeypatch):
    extractor, _, val = classifier
    file = tmp_path / "val-stats.pt"
    written = real_statistics(
        extractor, "id-1", val, tmp_path / "cache", 128, "cpu", stats_file=str(file), log=lambda m: None
    )
    assert file.is_file() and not (tmp_path / "cache").exists()
    monkeypatch.setattr(
        real_stats, "extract_features", lambda *a, **k: pytest.fail("feature pass for an existing file")
    )
    read = real_statistics(
        extractor, "id-1", val, tmp_path / "cache", 128, "cpu", stats_file=str(file), log=lambda m: None
    )
    assert (written["sigma"] == read["sigma"]).all()
    with pytest.raises(MetricsError, match="other extractor_id"):
        real_statistics(
            extractor, "id-2", val, tmp_path / "cache", 128, "cpu", stats_file=str(file), log=lambda m: None
        )


def test_extract_features_sees_every_real_image(classifier):
    extractor, _, val = classifier
    features = extract_features(extractor, val, 100, "cpu", progress=False)
    assert features["features"].shape == (val.num_samples, 128) and features["logits"].shape == (val.num_samples, 10)


def test_evaluator_scores_are_reproducible_and_report_class_accuracy(digits, eval_cache):
    cfg = sample_cfg(digits, eval_cache)
    evaluator = build_evaluator(cfg, "cpu", log=lambda m: None)
    torch.manual_seed(0)
    G, _ = build_models(cfg.model)
    G.train()
    a, b = evaluator(G, 200), evaluator(G, 200)
    assert a == b and set(a) == {"fid", "is", "is_std", "class_acc"}
    assert a["fid"] > 0 and 1.0 <= a["is"] <= 10.0 and 0.0 <= a["class_acc"] <= 1.0
    assert G.training  # evaluation put it in eval mode and back


def test_a_generator_replaying_real_images_scores_like_real_data(digits, eval_cache, classifier):
    """A 'generator' that returns real val images of the asked class: the classifier's own accuracy, FID ~0,
    IS near the class count (50 images per split keep it a little below)."""
    _, _, val = classifier
    images, labels = classifier_module.load_images(val)
    by_class = [images[labels == c] for c in range(10)]

    class Replay(torch.nn.Module):
        z_dim = 8

        def forward(self, z, y):
            idx = [int(z[i, 0].abs() * 1000) % len(by_class[c]) for i, c in enumerate(y.tolist())]
            return torch.stack([by_class[c][j] for c, j in zip(y.tolist(), idx)]).float() / 127.5 - 1

    evaluator = build_evaluator(sample_cfg(digits, eval_cache), "cpu", log=lambda m: None)
    scores = evaluator(Replay(), 500)
    assert scores["class_acc"] > 0.95 and scores["fid"] < 1.0 and scores["is"] > 7.0


def test_without_inception_weights_or_network_the_error_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(inception, "INCEPTION_URL", f"http://127.0.0.1:{_closed_port()}/weights.pth")
    with pytest.raises(MetricsError) as err:
        inception_weights(None)
    message = str(err.value)
    assert "--inception-weights" in message and "eval.inception_weights" in message and "\n" not in message
    with pytest.raises(MetricsError, match="do not exist"):
        inception_weights(str(tmp_path / "missing.pth"))


def test_inception_weights_of_the_wrong_file_are_refused_before_unpickling(tmp_path):
    bogus = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    bogus.write_bytes(b"not the weights")
    with pytest.raises(MetricsError, match="sha256"):
        inception_weights(str(bogus))


def test_evaluator_refuses_fewer_samples_than_is_splits(digits, eval_cache):
    cfg = sample_cfg(digits, eval_cache)
    evaluator = Evaluator(None, {}, 10, 8, torch.device("cpu"))
    with pytest.raises(MetricsError, match="at least 10"):
        evaluator(build_models(cfg.model)[0], 5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inception_path_scores_a_generator_with_stand_in_weights(tmp_path, monkeypatch):
    """The standard extractor's wiring (layers, uint8 input, weights lookup in TORCH_HOME) with randomly
    initialised weights: the real file cannot be downloaded here."""
    import hashlib

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as m:  # build the network once without weights, to save its random init
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        skeleton = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    file = home / "hub" / "checkpoints" / inception.INCEPTION_FILE
    file.parent.mkdir(parents=True)
    torch.save(skeleton.state_dict(), file)
    prefix = hashlib.sha256(file.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(inception, "INCEPTION_SHA256_PREFIX", prefix)  # the file check and the cache key
    assert inception_weights(None) == file
    cfg = load_config(None, ["model.ch=8", f"eval.cache_dir={tmp_path / 'shared-cache'}"])
    shared, identity = metrics.feature_weights(cfg)  # copied where every node sharing the cache finds it
    assert shared == tmp_path / "shared-cache" / inception.INCEPTION_FILE and shared.read_bytes() == file.read_bytes()

    extractor = create_feature_extractor(
        "inception-v3-compat",
        list(metrics.LAYERS["inception-v3-compat"]),
        cuda=False,
        feature_extractor_weights_path=str(file),
        verbose=False,
    )
    real = (torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    pool, logits = extractor(real)  # 32px in, resized to 299 inside, as for 128px ImageNet samples
    assert pool.shape == (24, 2048) and logits.shape == (24, 1008)
    torch.manual_seed(0)
    G, _ = build_models(cfg.model)
    scores = Evaluator(extractor, statistics(pool), 10, 10, torch.device("cpu"))(G, 20)
    assert set(scores) == {"fid", "is", "is_std"}  # no class accuracy: Inception's classes are not ours
    assert all(math.isfinite(v) for v in scores.values()) and 1.0 - 1e-9 <= scores["is"] <= 1008
