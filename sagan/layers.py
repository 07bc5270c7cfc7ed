"""Building blocks of SAGAN: spectrally normalised layers, self-attention, conditional BN, residual blocks.

Layers are made by small factories (`snconv2d`, `snlinear`, `snembedding`) that the blocks receive as
partials, so a block says what it is and the network decides whether it is spectrally normalised.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

# mmgeneration's SAGAN/BigGAN recipe: SN eps 1e-8 (mmgeneration's SAGAN config and README: with EMA and xavier init, FID 12.8 at ImageNet 128).
SN_EPS = 1e-8


class SpectralNormFP32(_SpectralNorm):
    """torch's spectral-norm parametrization (`parametrizations.spectral_norm`: the same state, `_u`/`_v`,
    and the same results) with its power iteration and sigma kept in the weights' fp32 under autocast: CUDA
    autocast would run `mv` in bf16/fp16, and a low-precision sigma rescales every weight by its error."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


def spectral_norm(layer: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """`layer` with its weight spectrally normalised (one power iteration per training forward)."""
    parametrize.register_parametrization(layer, "weight", SpectralNormFP32(layer.weight, 1, 0, eps))
    return layer


def _finish(layer: nn.Module, sn: bool) -> nn.Module:
    """Xavier-initialise `layer` (zero bias) and wrap it in spectral norm (one power iteration per forward)."""
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer) if sn else layer


def snconv2d(in_ch: int, out_ch: int, kernel_size: int = 3, *, sn: bool = True, bias: bool = True) -> nn.Module:
    """A same-padded Conv2d, spectrally normalised when `sn`."""
    return _finish(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias), sn)


def snlinear(in_features: int, out_features: int, *, sn: bool = True, bias: bool = True) -> nn.Module:
    """A Linear layer, spectrally normalised when `sn`."""
    return _finish(nn.Linear(in_features, out_features, bias=bias), sn)


def snembedding(num_embeddings: int, dim: int, *, sn: bool = True) -> nn.Module:
    """An Embedding table, spectrally normalised as one (num_embeddings, dim) matrix when `sn`."""
    return _finish(nn.Embedding(num_embeddings, dim), sn)


class SelfAttention(nn.Module):
    """Self-attention as in the released SAGAN (Zhang et al. 2019, and the official TF code).

    Query and key are 1x1 convs to C/8, value to C/2; key and value are 2x2 max-pooled, so each of the
    H*W query positions attends over (H/2)*(W/2) key positions. A 1x1 conv maps the result back to C and
    the block returns `gamma * o + x` with a learned scalar gamma that starts at 0 (an identity at init).
    `use_sdpa` picks the fused kernel (`scaled_dot_product_attention`) or explicit matmul + softmax: the
    same function; `use_sdpa(model, False)` switches a whole model, as the benchmark's reference path does.
    """

    use_sdpa = True

    def __init__(self, channels: int, sn: bool = True):
        super().__init__()
        if channels % 8:
            raise ValueError(f"SelfAttention needs channels divisible by 8, got {channels}")
        conv1x1 = partial(snconv2d, kernel_size=1, sn=sn, bias=False)
        self.theta = conv1x1(channels, channels // 8)  # queries
        self.phi = conv1x1(channels, channels // 8)  # keys
        self.g = conv1x1(channels, channels // 2)  # values
        self.o = conv1x1(channels // 2, channels)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """(B, C, H, W) -> (B, C, H, W); with `return_attn`, also the map (B, H*W, H*W/4), rows summing to 1."""
        b, c, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C/8)
        k = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)  # (B, HW/4, C/8)
        v = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)  # (B, HW/4, C/2)
        if return_attn or not self.use_sdpa:
            # Softmax over the keys: each query's weights sum to 1. The paper has no 1/sqrt(d) scale.
            attn = torch.softmax(q @ k.transpose(1, 2), dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
            out = out.squeeze(1)
        out = self.o(out.transpose(1, 2).reshape(b, c // 2, h, w))
        y = self.gamma * out + x
        return (y, attn) if return_attn else y


def use_sdpa(model: nn.Module, enabled: bool) -> None:
    """Make every SelfAttention in `model` use scaled_dot_product_attention (`enabled`) or matmul + softmax."""
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.use_sdpa = enabled


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then a per-class gain `1 + gain[y]` and bias `bias[y]` (not SN-normalised)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        # Zero tables: every class starts at gain 1, bias 0, as the official TF code's ones/zeros init.
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), y: (B,) class indices or (B, num_classes) class weights -> (B, C, H, W).
        Weights blend the classes' gains and biases (a one-hot row gives exactly that class's)."""
        if y.is_floating_point():
            y = y.to(self.gain.weight.dtype)
            gain, bias = y @ self.gain.weight, y @ self.bias.weight
        else:
            gain, bias = self.gain(y), self.bias(y)
        return self.bn(x) * (1 + gain[:, :, None, None]) + bias[:, :, None, None]


class GBlock(nn.Module):
    """Generator residual block: cBN, ReLU, 2x nearest up, conv, cBN, ReLU, conv; 1x1 shortcut after up."""

    def __init__(self, in_ch: int, out_ch: int, conv, cbn):
        super().__init__()
        self.bn1 = cbn(in_ch)
        self.conv1 = conv(in_ch, out_ch)
        self.bn2 = cbn(out_ch)
        self.conv2 = conv(out_ch, out_ch)
        self.shortcut = conv(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)."""
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Discriminator residual block (BigGAN's DBlock): [ReLU], conv, ReLU, conv, [2x2 avg-pool].

    The first block sees the image, so it has no leading ReLU and pools before its shortcut conv; later
    blocks pre-activate and pool after it. The shortcut conv exists only where shape changes.
    """

    def __init__(self, in_ch: int, out_ch: int, conv, downsample: bool, preactivation: bool):
        super().__init__()
        self.downsample = downsample
        self.preactivation = preactivation
        self.conv1 = conv(in_ch, out_ch)
        self.conv2 = conv(out_ch, out_ch)
        self.shortcut = conv(in_ch, out_ch, kernel_size=1) if (in_ch != out_ch or downsample) else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H/2, W/2) when downsampling, else (B, out_ch, H, W)."""
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        if self.shortcut is None:
            return h + x
        sc = self._pool(self.shortcut(x)) if self.preactivation else self.shortcut(self._pool(x))
        return h + sc
