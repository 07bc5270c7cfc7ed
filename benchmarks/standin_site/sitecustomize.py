"""Benchmarks only: lets the pipelines accept stand-in Inception weights, for timing FID where the real file
cannot be had (the GPU machine reaches no network). benchmarks/gpu_pipeline.py puts this folder on PYTHONPATH,
so every process it starts (Ray's workers too) imports this at start-up, and sets SAGAN_STANDIN_INCEPTION_SHA256
to the sha256 of the file it wrote.

sagan.inception checks the weights file by its sha256 before torch-fidelity unpickles it. When that module is
imported, the digest prefix it expects becomes the stand-in file's: that one file passes the check, any other
(the official one included) fails it, and the real-statistics cache keys on the stand-in digest, so no FID from
stand-in weights can meet a real one. FIDs computed this way mean nothing; the benchmark reports times only.
On this folder's PYTHONPATH, any sitecustomize of the Python installation itself is not run.
"""

import importlib.abc
import importlib.util
import os
import sys

DIGEST = os.environ.get("SAGAN_STANDIN_INCEPTION_SHA256", "")


class _StandIn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "sagan.inception":
            return None
        sys.meta_path.remove(self)  # find the real module below this finder, once
        spec = importlib.util.find_spec(name)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.INCEPTION_SHA256_PREFIX = DIGEST

        spec.loader.exec_module = exec_module
        return spec


if len(DIGEST) == 64:
    sys.meta_path.insert(0, _StandIn())
