#!/usr/bin/env bash
# The Python packages the lent GPU machine lacks, as cp312 wheels in .whl/ (git-ignored), Ray's without its Java
# worker; prints their total size with the working tree's (all of it must fit the 64 MiB that travels).
# Run here, where the package index is; then carry .whl to the device (benchmarks/gpu_pipeline.sh installs it).
# Details and the CPU proof: benchmarks/gpu_wheels.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_wheels.py download "$@"
