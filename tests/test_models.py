import pytest
import torch

from sagan.models import Discriminator, Generator, build_models, d_block_resolutions, g_block_resolutions


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_released_sagan_at_128():
    # StudioGAN's SAGAN, ch 64, 1000 classes, attention at 64x64 in G and D (PyTorch-StudioGAN, configs/ImageNet/SAGAN.yaml).
    G = Generator(resolution=128, ch=64, z_dim=128, num_classes=1000, attn_resolutions=(64,))
    D = Discriminator(resolution=128, ch=64, num_classes=1000, attn_resolutions=(64,))
    assert _count(G) == 42_017_412
    assert _count(D) == 39_448_258


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_and_ranges(resolution):
    torch.manual_seed(0)
    attn = (16,) if resolution == 32 else (32,)
    G = Generator(resolution, ch=8, z_dim=32, num_classes=5, attn_resolutions=attn)
    D = Discriminator(resolution, ch=8, num_classes=5, attn_resolutions=attn)
    z, y = torch.randn(3, 32), torch.tensor([0, 4, 2])
    x = G(z, y)
    assert x.shape == (3, 3, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    scores = D(x, y)
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()


def test_block_resolution_tables():
    assert g_block_resolutions(128) == [8, 16, 32, 64, 128]
    assert d_block_resolutions(128) == [64, 32, 16, 8, 4, 4]
    assert g_block_resolutions(32) == [8, 16, 32]
    assert d_block_resolutions(32) == [16, 8, 8, 8]


def test_attention_placement_follows_the_named_feature_maps():
    G = Generator(128, ch=8, num_classes=3, attn_resolutions=(32, 64))
    D = Discriminator(128, ch=8, num_classes=3, attn_resolutions=(64, 4))
    _, gmaps = G(torch.randn(1, 128), torch.tensor([0]), return_attn=True)
    _, dmaps = D(torch.randn(1, 3, 128, 128), torch.tensor([0]), return_attn=True)
    assert {s: m.shape for s, m in gmaps.items()} == {32: (1, 1024, 256), 64: (1, 4096, 1024)}
    assert {s: m.shape for s, m in dmaps.items()} == {64: (1, 4096, 1024), 4: (1, 16, 4)}


def test_no_attention_when_empty():
    G = Generator(32, ch=8, num_classes=3, attn_resolutions=())
    assert len(G.attn) == 0


def test_invalid_attention_resolution_names_valid_sizes():
    with pytest.raises(ValueError, match=r"Generator has no \[4\].*valid sizes are \[8, 16, 32\]"):
        Generator(32, ch=8, num_classes=3, attn_resolutions=(4,))
    with pytest.raises(ValueError, match=r"Discriminator has no \[32\].*\[8, 16\]"):
        Discriminator(32, ch=8, num_classes=3, attn_resolutions=(32,))


def test_unsupported_resolution_raises():
    with pytest.raises(ValueError, match="resolution 48 is not supported"):
        Generator(48, ch=8, num_classes=3, attn_resolutions=())


def test_seeded_build_gives_the_same_weights_and_leaves_the_global_rng_alone():
    from pipelines.common.config import load_config

    cfg = load_config(None, ["model.ch=8"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    (G1, D1), (G2, D2) = build_models(cfg.model, seed=7), build_models(cfg.model, seed=7)
    assert torch.rand(1) == before  # no draws from the caller's RNG
    for a, b in zip(
        [*G1.state_dict().values(), *D1.state_dict().values()], [*G2.state_dict().values(), *D2.state_dict().values()]
    ):
        assert torch.equal(a, b)
    G3, _ = build_models(cfg.model, seed=8)
    assert not torch.equal(G1.linear.parametrizations.weight.original, G3.linear.parametrizations.weight.original)
