"""Where a training step's time goes (benchmarks/train_step.py --profile N): torch.profiler over N steps, the top
kernels by their own device time, and the shares of the kinds of work, told apart by kernel name.

The kinds are patterns over kernel names (cuDNN, cuBLAS, FlashAttention and Triton kernels as they are named on
CUDA; aten operators on a CPU): a compiled step fuses elementwise work (batch norm's arithmetic, spectral norm's
power iteration, activations) into Triton kernels named after the operators they fuse, so those shares are
approximate, and "fused (triton)" is what no pattern claimed.
"""

import re

import torch

KINDS = [  # first match wins
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|softmax|bmm"),
    ("convolution", r"conv|cudnn|xmma|implicit_gemm|wgrad|dgrad|fprop|winograd|nchw|nhwc"),
    ("spectral norm", r"\bmv\b|gemv|addmv|vector_norm|_mv_|mv_"),
    ("batch norm", r"batch_norm|bn_|welford|native_batch"),
    ("matmul (linear, embedding)", r"gemm|cutlass|matmul|addmm|\bmm\b|linear|embedding"),
    ("fused (triton)", r"triton"),
    ("copy, fill, other", r""),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next(kind for kind, pattern in KINDS if re.search(pattern, low))


def profile_steps(step, steps: int, device: torch.device, top: int = 15) -> dict:
    """Profile `steps` calls of `step()`; the top kernels and the shares of each kind, by self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        # Labelled regions (compiled graphs, optimizer steps) also show as device events spanning their kernels:
        # counted, they would count those kernels twice (torch's own table leaves them out the same way).
        if getattr(event, "is_user_annotation", False):
            continue
        if us > 0 and (not cuda or event.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((event.key, us / steps, event.count // steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    shares: dict[str, float] = {}
    for name, us, _ in rows:
        shares[kind_of(name)] = shares.get(kind_of(name), 0.0) + us / total
    return {
        "clock": "device (CUDA kernels)" if cuda else "cpu (aten operators, self time)",
        "steps": steps,
        "ms_per_step": round(total / 1e3, 3),
        "shares": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        "top": [
            {"kernel": name[:120], "kind": kind_of(name), "ms_per_step": round(us / 1e3, 3), "calls_per_step": n}
            for name, us, n in rows[:top]
        ],
    }
