"""Images/s of the bare SAGAN training step (sagan.step.Trainer) on one device, printed as one JSON line.

    python benchmarks/train_step.py --resolution 32 --ch 16 --batch 32 --device cpu
    python benchmarks/train_step.py --resolution 128 --ch 64 --batch 64 --precision bf16 --device cuda

Images/s counts real images through D per second: batch x n_dis per step (what the data pipeline must feed).
"""

import argparse
import json
import platform
import sys
import time

import torch

from sagan.config import load_config
from sagan.models import build_models
from sagan.step import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32, choices=[32, 64, 128])
    p.add_argument("--ch", type=int, default=16, help="width multiplier (paper: 64)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="per-step batch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attn", type=int, nargs="*", default=None, help="attention sizes for G and D (default: 16 at 32px, else 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    attn = args.attn if args.attn is not None else ([16] if args.resolution == 32 else [64])
    cfg = load_config(None, [
        f"model.resolution={args.resolution}", f"model.ch={args.ch}", f"model.num_classes={args.num_classes}",
        f"model.g_attn={attn}", f"model.d_attn={attn}", f"train.precision={args.precision}",
        f"train.batch_size={args.batch}",
    ])  # fmt: skip
    device = torch.device(args.device)
    torch.manual_seed(0)
    G, D = build_models(cfg.model)
    trainer = Trainer(G.to(device), D.to(device), cfg)
    real = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    batches = [(real, labels)] * cfg.optim.n_dis

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        trainer.train_step(batches)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = trainer.train_step(batches)
    sync()
    elapsed = time.perf_counter() - start
    result = {
        "benchmark": "train_step",
        "resolution": args.resolution,
        "ch": args.ch,
        "batch": args.batch,
        "precision": args.precision,
        "attn": attn,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "steps": args.steps,
        "step_s": round(elapsed / args.steps, 4),
        "images_per_s": round(args.batch * cfg.optim.n_dis * args.steps / elapsed, 1),
        "finite": bool(all(torch.isfinite(v) for v in metrics.values())),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
