"""Whether the fast training step learns like the reference one (benchmarks/train_step.py --learning-steps): both
start from the same weights and see the same batches; their loss curves are compared, window by window, with
the gap the fast path shows between two draws of latents, and each model's spectral norm error is reported."""

import copy

import torch

from sagan.step import Trainer, unwrap


class Batches:
    """Batches of `batch` images from a pool, in order, wrapping around."""

    def __init__(self, pool, batch: int):
        self.x, self.y = pool
        self.batch, self.pos = batch, 0

    def __call__(self, n: int):
        out = []
        for _ in range(n):  # indices made on the device: no host-to-device copy (and no sync) per batch
            idx = torch.arange(self.pos, self.pos + self.batch, device=self.x.device) % len(self.y)
            out.append((self.x[idx], self.y[idx]))
            self.pos = (self.pos + self.batch) % len(self.y)
        return out


def losses_over(trainer: Trainer, initial: dict, pool, args, n_dis: int, seed: int) -> dict[str, list[float]]:
    """d_loss and g_loss of `args.learning_steps` steps from the initial state, data in order, latents from `seed`."""
    trainer.load_state_dict(copy.deepcopy(initial))
    batches = Batches(pool, args.batch)
    torch.manual_seed(seed)
    d, g = [], []
    for _ in range(args.learning_steps):
        m = trainer.train_step(batches(n_dis))
        d.append(m["d_loss"])
        g.append(m["g_loss"])
    return {"d_loss": torch.stack(d).tolist(), "g_loss": torch.stack(g).tolist()}


@torch.no_grad()
def spectral_norm_errors(model: torch.nn.Module) -> dict[str, float]:
    """{layer: largest singular value of the weight the layer uses - 1} over the spectrally normalised layers,
    signed: above 0, the power iteration's estimate u, v trails a weight that grew (its sigma is underestimated)."""
    from torch.nn.utils import parametrize

    errors = {}
    was_training = model.training
    model.eval()  # reading .weight in eval mode runs no power iteration: the weight as the last step used it
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            sigma = torch.linalg.matrix_norm(module.weight.detach().flatten(1).double(), ord=2).item()
            errors[name] = round(sigma - 1, 5)
    model.train(was_training)
    return errors


def spectral_norm_error(model: torch.nn.Module) -> float:
    """max over SN layers of |largest singular value of the weight the layer uses - 1|."""
    return max((abs(e) for e in spectral_norm_errors(model).values()), default=0.0)


def window_means(values: list[float], window: int) -> list[float]:
    return [sum(values[i : i + window]) / len(values[i : i + window]) for i in range(0, len(values), window)]


def compare_curves(a: dict, b: dict, window: int) -> dict:
    """Largest gap between two runs' windowed mean d_loss and g_loss."""
    out = {}
    for key in ("d_loss", "g_loss"):
        wa, wb = window_means(a[key], window), window_means(b[key], window)
        out[f"{key}_max_window_gap"] = round(max(abs(x - y) for x, y in zip(wa, wb)), 4)
        out[f"{key}_mean_abs_gap"] = round(sum(abs(x - y) for x, y in zip(a[key], b[key])) / len(a[key]), 4)
    return out


def learning_check(trainers: dict, initial: dict, pool, args, n_dis: int) -> dict:
    """The fast path's loss curves against the reference's from the same weights, data and latents; the
    yardstick is the fast path against itself with other latents (how far two equally good runs drift)."""

    runs = {
        "reference": losses_over(trainers["reference"], initial["reference"], pool, args, n_dis, seed=1),
        "fast": losses_over(trainers["fast"], initial["fast"], pool, args, n_dis, seed=1),
    }
    sn = {
        name: {"G": round(spectral_norm_error(unwrap(t.G)), 5), "D": round(spectral_norm_error(unwrap(t.D)), 5)}
        for name, t in trainers.items()
    }
    by_layer = {
        name: {m: spectral_norm_errors(unwrap(getattr(t, m))) for m in ("G", "D")} for name, t in trainers.items()
    }
    runs["fast_other_latents"] = losses_over(trainers["fast"], initial["fast"], pool, args, n_dis, seed=2)
    gap = compare_curves(runs["fast"], runs["reference"], args.window)
    yardstick = compare_curves(runs["fast"], runs["fast_other_latents"], args.window)
    return {
        "steps": args.learning_steps,
        "window": args.window,
        "fast_vs_reference": gap,
        "fast_vs_fast_other_latents": yardstick,
        "within_yardstick": all(gap[k] <= max(yardstick[k], 0.02) for k in gap if "window" in k),
        "spectral_norm_max_error_after": sn,
        "spectral_norm_error_by_layer": by_layer,  # sigma - 1 per layer: where a larger error sits
        "curves": runs,
    }
