"""SAGAN (Self-Attention GAN) as a plain PyTorch library: models, losses, training step, config, checkpoints.

No Ray and no MLflow here: `from sagan.models import Generator` works in a notebook with nothing running.
"""
