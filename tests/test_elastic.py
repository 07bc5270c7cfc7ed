"""Elastic training's pieces that need no cluster: the resize line, the per-step record of samples, the config.
The run itself, a node lost and back, is tests/test_multinode.py's (make test-cluster)."""

import json

import pytest
import torch

from pipelines.common.config import load_config
from pipelines.training.batch_log import ENV, BatchLog, read_log, sample_ids
from pipelines.training.worker import resize_line


def test_a_group_of_another_size_than_its_checkpoints_says_when_from_to_and_why():
    cfg = load_config(None, ["scaling.num_workers=[1,4]", "train.batch_size=8"])
    assert resize_line(cfg, 2, 40, {}) is None  # a new run
    assert resize_line(cfg, 2, 40, {"world_size": 2}) is None  # the same size
    shrunk = resize_line(cfg, 1, 40, {"world_size": 2})
    assert "step 40: 2 -> 1 workers (fewer workers could be placed" in shrunk and "global batch (32)" in shrunk
    assert "3 -> 4 workers (more workers could be placed at a resize check)" in resize_line(
        cfg, 4, 50, {"world_size": 3}
    )


def test_the_batch_log_keeps_each_step_of_the_group_that_ran_it_last(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y = torch.arange(4)
    ids = sample_ids(((x + 1) * 127.5).round().to(torch.uint8), y)
    assert len(set(ids)) == 4
    two = [BatchLog(0, 2), BatchLog(1, 2)]  # steps 1-3 on two workers, each half the samples
    for step in (1, 2, 3):
        two[0].record(step, [(x[:2], y[:2])])
        two[1].record(step, [(x[2:], y[2:])])
    one = BatchLog(0, 1)  # after a loss: one worker goes on from step 3's checkpoint at 2... takes steps 3-4
    for step in (3, 4):
        one.record(step, [(x, y)])
    steps = read_log(tmp_path)
    assert steps == {s: sorted(ids) for s in (1, 2, 3, 4)}  # step 3 once: not one worker's and two's together
    lines = [json.loads(line) for p in tmp_path.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert {(e["step"], e["world"]) for e in lines} >= {(3, 1), (3, 2)}


def test_without_the_variable_the_batch_log_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    BatchLog(0, 1).record(1, [(torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long))])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "value, elastic, low, high", [("3", False, 3, 3), ("[1,2]", True, 1, 2), ("[2,2]", False, 2, 2)]
)
def test_num_workers_is_a_size_or_a_range(value, elastic, low, high):
    s = load_config(None, [f"scaling.num_workers={value}"]).scaling
    assert (s.elastic, s.min_workers, s.max_workers) == (elastic, low, high)


def test_a_non_finite_loss_of_any_virtual_rank_shows_in_the_losses_the_run_checks():
    from sagan.models import build_models
    from sagan.step import Trainer, latent_seed
    from tests.test_step import real_batch, tiny_config

    cfg = tiny_config()
    trainer = Trainer(*build_models(cfg.model, seed=0), cfg)
    (x0, y0), (x1, y1) = real_batch(seed=1), real_batch(seed=2)
    x1 = x1.clone()
    x1[0, 0, 0, 0] = float("nan")  # virtual rank 1's batch only
    losses = trainer.train_step([(torch.cat([x0, x1]), torch.cat([y0, y1]))], ranks=(0, 1), weight=0.5)
    assert not torch.isfinite(losses["d_loss"])  # the logged value is rank 0's, the check sees rank 1's too
    fine = Trainer(*build_models(cfg.model, seed=0), cfg)
    clean = fine.train_step([(torch.cat([x0, real_batch(seed=2)[0]]), torch.cat([y0, y1]))], ranks=(0, 1), weight=0.5)
    assert torch.isfinite(clean["d_loss"]) and torch.isfinite(clean["g_loss"])
    seeds = {latent_seed(0, v, s, d) for v in range(4) for s in range(1, 40) for d in range(3)}
    assert len(seeds) == 4 * 39 * 3  # no two draws share latents
