"""GAN losses. Each takes raw discriminator scores (B,) and returns a scalar."""

import torch
import torch.nn.functional as F


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(D(G(z)))."""
    return -fake_scores.mean()
