"""Seconds to import each heavy dependency in a fresh interpreter (the median of --repeat runs), on top of what
every process here imports anyway (torch, numpy). The project imports these inside the functions that need them
where a process that never needs them would otherwise pay this at start-up; the comments there cite this script.

    python benchmarks/import_times.py [--repeat 3]
"""

import argparse
import statistics
import subprocess
import sys

BASE = "import numpy, torch"
MODULES = [
    "ray",
    "ray.train.torch",
    "ray.tune",
    "mlflow",
    "torchvision",
    "torch_fidelity",
    "sagan.metrics",
    "sklearn.datasets",
    "webdataset",
    "pyarrow.fs",
    "torch._dynamo",
]


def seconds(statement: str) -> float:
    code = f"import time; {BASE}; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per module; the median is reported (default 3)")
    args = p.parse_args(argv)
    print(f"{'module':<18} seconds (median of {args.repeat}, after `{BASE}`)")
    for module in MODULES:
        runs = [seconds(f"import {module}") for _ in range(args.repeat)]
        print(f"{module:<18} {statistics.median(runs):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
