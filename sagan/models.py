"""SAGAN generator and projection discriminator, with per-resolution architecture tables.

The tables follow BigGAN-PyTorch's G_arch/D_arch (which reproduce the released SAGAN): channel widths are
multiples of `ch`, and attention can follow any block, named by the feature-map size that block outputs.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionalBatchNorm2d, DBlock, GBlock, SelfAttention, snconv2d, snembedding, snlinear

# Generator: a linear layer makes a 4x4 map of in_mult[0]*ch channels; each block doubles the size.
G_ARCH = {
    32: {"in_mult": (4, 4, 4), "out_mult": (4, 4, 4)},
    64: {"in_mult": (16, 16, 8, 4), "out_mult": (16, 8, 4, 2)},
    128: {"in_mult": (16, 16, 8, 4, 2), "out_mult": (16, 8, 4, 2, 1)},
}
# Discriminator: out_mult per block (the first block reads the 3-channel image) and which blocks pool.
D_ARCH = {
    32: {"out_mult": (4, 4, 4, 4), "downsample": (True, True, False, False)},
    64: {"out_mult": (1, 2, 4, 8, 16), "downsample": (True, True, True, True, False)},
    128: {"out_mult": (1, 2, 4, 8, 16, 16), "downsample": (True, True, True, True, True, False)},
}


def _check_resolution(resolution: int) -> None:
    if resolution not in G_ARCH:
        raise ValueError(f"resolution {resolution} is not supported; use one of {sorted(G_ARCH)}")


def g_block_resolutions(resolution: int) -> list[int]:
    """Feature-map size after each generator block, e.g. [8, 16, 32, 64, 128] at 128."""
    _check_resolution(resolution)
    return [8 * 2**i for i in range(len(G_ARCH[resolution]["in_mult"]))]


def d_block_resolutions(resolution: int) -> list[int]:
    """Feature-map size after each discriminator block, e.g. [64, 32, 16, 8, 4, 4] at 128."""
    _check_resolution(resolution)
    sizes, size = [], resolution
    for down in D_ARCH[resolution]["downsample"]:
        size = size // 2 if down else size
        sizes.append(size)
    return sizes


def check_attn_resolutions(net: str, attn: tuple, valid: list[int]) -> None:
    """Raise ValueError naming the valid sizes when `attn` holds a size the network lacks."""
    bad = sorted(set(attn) - set(valid))
    if bad:
        raise ValueError(f"{net} has no {bad} feature map for attention; valid sizes are {sorted(set(valid))}")


def attention_channels(resolution: int, ch: int, g_attn, d_attn) -> dict[str, int]:
    """{"G@16": channels, "D@16": channels, ...}: the width each requested attention block would have."""
    g_sizes, d_sizes = g_block_resolutions(resolution), d_block_resolutions(resolution)
    out = {f"G@{s}": G_ARCH[resolution]["out_mult"][g_sizes.index(s)] * ch for s in g_attn if s in g_sizes}
    out.update({f"D@{s}": D_ARCH[resolution]["out_mult"][d_sizes.index(s)] * ch for s in d_attn if s in d_sizes})
    return out


class Generator(nn.Module):
    """Class-conditional SAGAN generator: z (B, z_dim), y (B,) -> images (B, 3, R, R) in [-1, 1]. y may also
    be (B, num_classes) class weights, which blend the classes (sagan.sampling.interpolation_inputs)."""

    def __init__(self, resolution=128, ch=64, z_dim=128, num_classes=1000, attn_resolutions=(64,), sn=True):
        super().__init__()
        sizes = g_block_resolutions(resolution)  # also rejects an unsupported resolution
        arch = G_ARCH[resolution]
        check_attn_resolutions("Generator", tuple(attn_resolutions), sizes)
        self.z_dim, self.num_classes = z_dim, num_classes
        conv = partial(snconv2d, sn=sn)
        cbn = partial(ConditionalBatchNorm2d, num_classes=num_classes)
        self.in_ch = arch["in_mult"][0] * ch
        self.linear = snlinear(z_dim, 4 * 4 * self.in_ch, sn=sn)
        self.blocks = nn.ModuleList(
            GBlock(i * ch, o * ch, conv, cbn) for i, o in zip(arch["in_mult"], arch["out_mult"])
        )
        # Attention follows the block whose output has that size (ModuleDict keys must be strings).
        self.attn = nn.ModuleDict(
            {
                str(i): SelfAttention(arch["out_mult"][i] * ch, sn=sn)
                for i, size in enumerate(sizes)
                if size in attn_resolutions
            }
        )
        out_ch = arch["out_mult"][-1] * ch
        self.out_bn = nn.BatchNorm2d(out_ch)
        self.out_conv = conv(out_ch, 3)

    def forward(self, z: torch.Tensor, y: torch.Tensor, return_attn: bool = False):
        """(B, z_dim), (B,) -> (B, 3, R, R); with `return_attn`, also {feature size: (B, HW, HW/4) map}."""
        h = self.linear(z).view(z.shape[0], self.in_ch, 4, 4)
        maps = {}
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if str(i) in self.attn:
                if return_attn:
                    h, maps[h.shape[-1]] = self.attn[str(i)](h, return_attn=True)
                else:
                    h = self.attn[str(i)](h)
        x = torch.tanh(self.out_conv(F.relu(self.out_bn(h))))
        return (x, maps) if return_attn else x


class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018): images (B, 3, R, R), y (B,) -> raw scores (B,)."""

    def __init__(self, resolution=128, ch=64, num_classes=1000, attn_resolutions=(64,), sn=True):
        super().__init__()
        _check_resolution(resolution)
        arch = D_ARCH[resolution]
        sizes = d_block_resolutions(resolution)
        check_attn_resolutions("Discriminator", tuple(attn_resolutions), sizes)
        conv = partial(snconv2d, sn=sn)
        in_chs = [3] + [m * ch for m in arch["out_mult"][:-1]]
        self.blocks = nn.ModuleList(
            DBlock(i, o * ch, conv, downsample=down, preactivation=(k > 0))
            for k, (i, o, down) in enumerate(zip(in_chs, arch["out_mult"], arch["downsample"]))
        )
        # Attention once per size: after the first block that reaches it (the 128 net ends with two 4x4 blocks).
        first_at = {s: i for i, s in reversed(list(enumerate(sizes)))}
        self.attn = nn.ModuleDict(
            {str(first_at[s]): SelfAttention(arch["out_mult"][first_at[s]] * ch, sn=sn) for s in attn_resolutions}
        )
        out_ch = arch["out_mult"][-1] * ch
        self.linear = snlinear(out_ch, 1, sn=sn)
        self.embed = snembedding(num_classes, out_ch, sn=sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_attn: bool = False):
        """(B, 3, R, R), (B,) -> (B,); with `return_attn`, also {feature size: (B, HW, HW/4) map}."""
        h, maps = x, {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                if return_attn:
                    h, maps[h.shape[-1]] = self.attn[str(i)](h, return_attn=True)
                else:
                    h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))  # global sum pooling, (B, C)
        out = self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
        return (out, maps) if return_attn else out


def generator_kwargs(model_cfg) -> dict:
    """The keyword arguments of `Generator` for a `ModelConfig` (plain values: they travel as JSON in exports)."""
    c = model_cfg
    return {
        "resolution": c.resolution,
        "ch": c.ch,
        "z_dim": c.z_dim,
        "num_classes": c.num_classes,
        "attn_resolutions": list(c.g_attn),
        "sn": c.g_sn,
    }


def build_models(model_cfg, seed: int | None = None) -> tuple[Generator, Discriminator]:
    """(Generator, Discriminator) from a `ModelConfig`; with `seed`, initialised from that seed alone (the
    same weights on every rank and in every later rebuild of a run's step 0), the global RNG untouched."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_models(model_cfg)
    c = model_cfg
    G = Generator(**generator_kwargs(c))
    D = Discriminator(c.resolution, c.ch, c.num_classes, tuple(c.d_attn), sn=c.d_sn)
    return G, D
