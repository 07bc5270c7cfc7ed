"""Time of one FID + IS pass (sagan.metrics.Evaluator, torch-fidelity's Inception v3) over N generated images.

    python benchmarks/eval_speed.py --num-samples 50000 --out eval_speed.json          # the standard 50k pass
    python benchmarks/eval_speed.py --resolution 32 --ch 8 --num-samples 200 --device cpu  # every code path, tiny

The Inception network runs with stand-in random weights unless --inception-weights names the real file:
the same layers and shapes, so the same time (the real file cannot be downloaded offline). The generator is
the 128px SAGAN at random init, in eval mode, as the EMA generator is scored. The real statistics are
random too (FID's matrix square root costs the same on any statistics). Prints one JSON line.
"""

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagan.config import INCEPTION
from sagan.metrics import Evaluator
from sagan.models import Generator
from sagan.real_stats import LAYERS, statistics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch", type=int, default=250, help="images per generator and Inception batch (eval.batch_size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", default=None, help="the real weights file (default: stand-in random weights)")
    p.add_argument("--out", default=None, help="also write the result here as JSON")
    return p.parse_args(argv)


def stand_in_inception_weights(folder: Path) -> Path:
    """A state dict for torch-fidelity's Inception v3 with its random initial weights, saved in `folder`."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # Build the network without loading weights (patched for this one construction only), then save it.
    load_url, load_sd = tf_inception.load_state_dict_from_url, tf_inception.FeatureExtractorInceptionV3.load_state_dict
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}
    tf_inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
    try:
        skeleton = tf_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    finally:
        tf_inception.load_state_dict_from_url, tf_inception.FeatureExtractorInceptionV3.load_state_dict = (
            load_url,
            load_sd,
        )
    path = folder / "stand-in-inception.pth"
    torch.save(skeleton.state_dict(), path)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    from torch_fidelity.utils import create_feature_extractor

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    G = Generator(args.resolution, args.ch, 128, args.num_classes, (64,) if args.resolution > 32 else (16,)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.inception_weights or str(stand_in_inception_weights(Path(tmp)))
        with torch.cuda.device(device) if cuda else torch.device("cpu"):
            extractor = create_feature_extractor(
                INCEPTION, list(LAYERS[INCEPTION]), cuda=cuda, feature_extractor_weights_path=weights, verbose=False
            )
    real = statistics(torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0)))
    evaluator = Evaluator(extractor, real, args.num_classes, args.batch, device)
    evaluator(G, max(10, 2 * args.batch))  # warm-up: cuDNN autotuning and lazy initialisation stay out
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    scores = evaluator(G, args.num_samples)
    seconds = time.perf_counter() - start
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    result = {
        "benchmark": "eval_speed",
        **env,
        "resolution": args.resolution,
        "ch": args.ch,
        "num_samples": args.num_samples,
        "batch": args.batch,
        "inception_weights": "real" if args.inception_weights else "stand-in (random)",
        "seconds": round(seconds, 1),
        "images_per_s": round(args.num_samples / seconds, 1),
        "finite": all(np.isfinite(v) for v in scores.values()),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
