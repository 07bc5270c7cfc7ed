"""Speed of the SAGAN training step (sagan.step.Trainer) on one device: the reference path, the fast path and
each lever alone, side by side in one run, plus a check that the fast path learns like the reference.

    # the GPU measurement (issue 13): 128px, ch 64, attention at 64 in G and D, batch 256
    python benchmarks/train_step.py --preset imagenet128 --learning-steps 200 --out train_step.json
    # every code path at tiny size on a CPU (compile through the aot_eager backend)
    python benchmarks/train_step.py --resolution 32 --ch 8 --batch 8 --device cpu --compile-backend aot_eager \\
        --warmup 1 --steps 2 --learning-steps 6

One step is one D update (on real + fake) and one G update, with spectral norm and the EMA of G. images/s
counts real images through D: batch x n_dis per step. MFU is the step's FLOPs (counted once with
torch.utils.flop_counter on the reference path) per second over the GPU's dense bf16 peak (--peak-tflops).
Variants run in priority order and are skipped once --budget-s has passed; the JSON is rewritten after each.
"""

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.learning_check import Batches, learning_check
from benchmarks.profile_step import profile_steps
from pipelines.common.config import load_config
from sagan.models import build_models
from sagan.speed import Speed, prepare_models
from sagan.step import LossMonitor, Trainer

# The issue's reference path: fp32, eager, attention as explicit matmul + softmax, contiguous NCHW, foreach Adam.
REFERENCE = {
    "precision": "fp32",
    "channels_last": False,
    "compile": False,
    "fused_adam": False,
    "sdpa": False,
    "cudnn_benchmark": False,
}
LEVERS = {
    "bf16": {"precision": "bf16"},
    "channels_last": {"channels_last": True},
    "sdpa": {"sdpa": True},
    "fused_adam": {"fused_adam": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "compile": {"compile": True},
}
FAST = {k: v for lever in LEVERS.values() for k, v in lever.items()}
# Name -> levers on top of the reference. Run in this order (most important first) until the budget is spent.
VARIANTS = {
    "reference": {},
    "fast": FAST,
    "fast_eager": {k: v for k, v in FAST.items() if k != "compile"},
    **{f"+{name}": lever for name, lever in LEVERS.items() if name != "compile"},
    "fast_ddp": FAST,  # the fast path inside DistributedDataParallel (one process, NCCL on a GPU)
    "+compile": LEVERS["compile"],
    "fast_cudagraphs": {**FAST, "compile_mode": "reduce-overhead"},  # the fast path replaying CUDA graphs
    "fast_autotune": {**FAST, "compile_mode": "max-autotune-no-cudagraphs"},  # inductor's kernel autotuning alone
}
# Run only when named: max-autotune compiles several times longer than the fast path, which the budget guard
# (it estimates a compiled variant by the fast one's warm-up) would not foresee.
OPT_IN = ("fast_autotune",)
PRESETS = {
    "imagenet128": ["--resolution", "128", "--ch", "64", "--num-classes", "1000", "--batch", "256", "--attn", "64"]
}
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100/H200 SXM datasheet, dense bf16 (the same chip in both)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="expand to a preset's model and batch (later flags win)")
    p.add_argument("--resolution", type=int, default=32, choices=[32, 64, 128])
    p.add_argument("--ch", type=int, default=16, help="width multiplier (paper: 64)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="per-step batch")
    p.add_argument(
        "--attn", type=int, nargs="*", default=None, help="attention sizes for G and D (default: 16 at 32px, else 64)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if v not in OPT_IN),
        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all but {', '.join(OPT_IN)})",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager on a CPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument(
        "--learning-steps", type=int, default=0, help="steps of the reference-vs-fast learning check (0: none)"
    )
    p.add_argument("--window", type=int, default=20, help="steps per window when comparing loss curves")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new variant after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="the GPU's dense bf16 peak")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", type=int, default=0, help="profile this many steps of the fast variant (0: none)")
    p.add_argument("--out", default=None, help="write the results here as JSON (rewritten after each variant)")
    argv = sys.argv[1:] if argv is None else list(argv)
    first = p.parse_args(argv)
    return p.parse_args(PRESETS[first.preset] + argv) if first.preset else first


def environment(device: torch.device) -> dict:
    """Device, driver, torch and CUDA versions and the date: what every figure is recorded with."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            multiprocessors=props.multi_processor_count,
        )
        # PyTorch's defaults: fp32 convolutions may use TF32 tensor cores, fp32 matmuls may not.
        env.update(
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32
        )
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def image_pool(n: int, num_classes: int, resolution: int, device, seed: int = 0):
    """(images (n, 3, R, R) in [-1, 1], labels (n,)): smooth class-dependent colour fields plus per-image
    noise, the same for a seed; a fixed "dataset" so both paths see the same batches."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    base = torch.rand(num_classes, 3, 4, 4, generator=gen) * 2 - 1  # one coarse pattern per class
    detail = torch.rand(n, 3, 16, 16, generator=gen) * 0.6 - 0.3
    up = torch.nn.functional.interpolate
    x = up(base[labels], size=resolution, mode="bilinear") + up(detail, size=resolution, mode="bilinear")
    return x.clamp(-1, 1).to(device), labels.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainer(cfg, speed: Speed, device: torch.device, ddp: bool = False) -> Trainer:
    """A Trainer on `device` with `speed`, from seed 0's weights; with `ddp`, G and D inside DDP (world 1)."""
    G, D = build_models(cfg.model, seed=0)
    G, D = G.to(device), D.to(device)
    if ddp:
        prepare_models(speed, G, D)
        ids = [device.index or 0] if device.type == "cuda" else None
        G = torch.nn.parallel.DistributedDataParallel(G, device_ids=ids)
        D = torch.nn.parallel.DistributedDataParallel(D, device_ids=ids)
    return Trainer(G, D, cfg, speed)


def init_single_process_group(device: torch.device) -> None:
    """A one-process torch.distributed group (NCCL on a GPU, gloo on a CPU) for the DDP variant."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def host_syncs_per_step(trainer: Trainer, batches: Batches, n_dis: int, steps: int = 2) -> float | None:
    """Host synchronisations per step of the training loop's work (the step and LossMonitor.update),
    counted by CUDA's sync debug mode (None on a CPU)."""
    if trainer.device.type != "cuda":
        return None
    monitor = LossMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                monitor.update(trainer.step + 1, trainer.train_step(batches(n_dis)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def count_flops(trainer: Trainer, batches: Batches, n_dis: int) -> int:
    """FLOPs of one training step (forward and backward, D and G updates), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batches(n_dis))
    return counter.get_total_flops()


def time_variant(trainer: Trainer, batches: Batches, args, n_dis: int) -> dict:
    """Warm-up (compilation) and timed steps of `trainer`: step time, images/s, peak memory, host syncs."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(batches(n_dis))
    sync(device)
    warmup_s = time.perf_counter() - start
    monitor = LossMonitor()  # as the training loop does: losses stay on the device between log steps
    start = time.perf_counter()
    for _ in range(args.steps):
        monitor.update(trainer.step + 1, trainer.train_step(batches(n_dis)))
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    return {
        "step_s": round(step_s, 5),
        "images_per_s": round(args.batch * n_dis / step_s, 1),
        "warmup_s": round(warmup_s, 1),  # includes compilation for compiled variants
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "host_syncs_per_step": host_syncs_per_step(trainer, batches, n_dis),
        "finite": monitor.read()[1] is None,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.learning_steps and not {"reference", "fast"} <= set(names):
        sys.exit("error: --learning-steps compares the reference and fast variants: include both in --variants")
    if args.threads:
        torch.set_num_threads(args.threads)
    attn = args.attn if args.attn is not None else ([16] if args.resolution == 32 else [64])
    cfg = load_config(
        None,
        [
            f"model.resolution={args.resolution}",
            f"model.ch={args.ch}",
            f"model.num_classes={args.num_classes}",
            f"model.g_attn={attn}",
            f"model.d_attn={attn}",
            f"train.batch_size={args.batch}",
            "train.ema_decay=0.999",
        ],
    )
    n_dis = cfg.optim.n_dis
    device = torch.device(args.device)
    began = time.perf_counter()
    result = {
        "benchmark": "train_step",
        "setting": {
            "resolution": args.resolution,
            "ch": args.ch,
            "num_classes": args.num_classes,
            "batch": args.batch,
            "attn_g": attn,
            "attn_d": attn,
            "n_dis": n_dis,
            "warmup": args.warmup,
            "steps": args.steps,
            "peak_tflops_bf16_dense": args.peak_tflops,
        },
        "environment": environment(device),
        "variants": {},
    }

    def save():
        result["wall_s"] = round(time.perf_counter() - began, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{args.out}.tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.out)

    pool = image_pool(8 * args.batch, args.num_classes, args.resolution, device)
    batches = Batches(pool, args.batch)
    kept, initial = {}, {}
    for name in names:
        if time.perf_counter() - began > args.budget_s:
            result["variants"][name] = {"skipped": f"budget of {args.budget_s:.0f}s spent"}
            print(f"{name:>16}: skipped (budget)", flush=True)
            continue
        speed = Speed(**{**REFERENCE, **VARIANTS[name], "compile_backend": args.compile_backend})
        compile_s = result["variants"].get("fast", {}).get("warmup_s", 0)  # what a compiled variant will take
        if speed.compile and time.perf_counter() - began + compile_s > args.budget_s:
            result["variants"][name] = {
                "skipped": f"compiling (~{compile_s:.0f}s) would overrun the {args.budget_s:.0f}s budget"
            }
            print(f"{name:>16}: skipped (compile would overrun the budget)", flush=True)
            continue
        try:
            if name == "fast_ddp":
                init_single_process_group(device)
            trainer = build_trainer(cfg, speed, device, ddp=name == "fast_ddp")
            if name in ("reference", "fast"):  # kept for the learning check, from the same initial state
                initial[name] = copy.deepcopy(trainer.state_dict())
                kept[name] = trainer
            row = {"levers": VARIANTS[name], **time_variant(trainer, batches, args, n_dis)}
            if name == "reference":
                result["flops_per_step"] = count_flops(trainer, batches, n_dis)
                result["gflops_per_image"] = round(result["flops_per_step"] / (args.batch * n_dis) / 1e9, 1)
            if args.profile and name == "fast":  # where its time goes (benchmarks/profile_step.py)
                try:
                    row["profile"] = profile_steps(lambda t=trainer: t.train_step(batches(n_dis)), args.profile, device)
                except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the variant's timing
                    row["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if "flops_per_step" in result:
                row["mfu"] = round(result["flops_per_step"] / row["step_s"] / (args.peak_tflops * 1e12), 6)
        except Exception as e:  # noqa: BLE001 - one lever failing must not lose the others' figures
            row = {"levers": VARIANTS[name], "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["variants"][name] = row
        print(f"{name:>16}: {json.dumps(row)}", flush=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
        if name == "fast" and args.learning_steps and set(kept) == {"reference", "fast"}:
            start = time.perf_counter()
            result["learning"] = learning_check(kept, initial, pool, args, n_dis)
            result["learning"]["wall_s"] = round(time.perf_counter() - start, 1)
            kept.clear()
            save()
    ref = result["variants"].get("reference", {}).get("images_per_s")
    for row in result["variants"].values():
        if ref and "images_per_s" in row:
            row["speedup_vs_reference"] = round(row["images_per_s"] / ref, 2)
    save()
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['environment']['device']}, torch {result['environment']['torch']}, setting {result['setting']}")
    print(
        f"{'variant':>16} {'step ms':>9} {'img/s':>9} {'x ref':>6} {'MFU':>6} {'peak GiB':>9} {'syncs':>6} {'warmup s':>9}"
    )
    for name, r in result["variants"].items():
        if "images_per_s" not in r:
            print(f"{name:>16}  {r.get('error') or r.get('skipped')}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(
            f"{name:>16} {r['step_s'] * 1e3:9.1f} {r['images_per_s']:9.1f} {r.get('speedup_vs_reference', 0):6.2f} "
            f"{mfu:>6} {str(r['peak_memory_gib']):>9} {str(r['host_syncs_per_step']):>6} {r['warmup_s']:9.1f}"
        )
    if "learning" in result:
        learn = result["learning"]
        print(
            f"learning check over {learn['steps']} steps: fast vs reference {learn['fast_vs_reference']}, "
            f"fast vs fast (other latents) {learn['fast_vs_fast_other_latents']}, "
            f"SN max |sigma - 1| {learn['spectral_norm_max_error_after']}"
        )


if __name__ == "__main__":
    main()
