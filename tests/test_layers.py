import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sagan.layers import ConditionalBatchNorm2d, SelfAttention
from sagan.models import Discriminator, Generator


def _sn_modules(model):
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def test_spectral_norm_makes_largest_singular_value_one():
    torch.manual_seed(0)
    G = Generator(32, ch=8, z_dim=16, num_classes=3, attn_resolutions=(16,))
    D = Discriminator(32, ch=8, num_classes=3, attn_resolutions=(16,))
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    for _ in range(100):  # each training forward runs one power iteration per layer
        D(G(z, y), y)
    for model in (G, D):
        modules = _sn_modules(model)
        assert len(modules) > 10
        for m in modules:
            w = m.weight.detach()
            sigma = torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0].item()
            assert abs(sigma - 1.0) < 1e-2, (type(m).__name__, tuple(w.shape), sigma)


def test_sn_off_leaves_no_parametrization():
    G = Generator(32, ch=8, z_dim=16, num_classes=3, attn_resolutions=(), sn=False)
    assert _sn_modules(G) == []


def test_g_class_conditional_batchnorm_tables_are_not_spectrally_normalised():
    G = Generator(32, ch=8, z_dim=16, num_classes=3, attn_resolutions=())
    for m in G.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            assert not parametrize.is_parametrized(m.gain, "weight")
            assert not parametrize.is_parametrized(m.bias, "weight")


def test_attention_is_identity_while_gamma_is_zero():
    attn = SelfAttention(32)
    x = torch.randn(2, 32, 8, 8)
    assert attn.gamma.item() == 0.0
    assert torch.equal(attn(x), x)


def test_attention_rows_sum_to_one():
    torch.manual_seed(0)
    attn = SelfAttention(32)
    _, amap = attn(torch.randn(2, 32, 8, 8), return_attn=True)
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 64))
    assert (amap >= 0).all()


def test_attention_map_shape_is_queries_by_pooled_keys():
    attn = SelfAttention(64)
    y, amap = attn(torch.randn(3, 64, 16, 8), return_attn=True)
    assert y.shape == (3, 64, 16, 8)
    assert amap.shape == (3, 16 * 8, 8 * 4)


def _naive_attention(module, x):
    """softmax(Q K^T) V by explicit loops over query positions, with the module's own weights."""
    b, c, h, w = x.shape
    theta = module.theta.weight.reshape(c // 8, c)
    phi = module.phi.weight.reshape(c // 8, c)
    g = module.g.weight.reshape(c // 2, c)
    o = module.o.weight.reshape(c, c // 2)
    out = torch.empty_like(x)
    for i in range(b):
        feats = x[i].reshape(c, h * w)  # (C, N)
        keys = F.max_pool2d((phi @ feats).reshape(1, c // 8, h, w), 2).reshape(c // 8, -1)
        vals = F.max_pool2d((g @ feats).reshape(1, c // 2, h, w), 2).reshape(c // 2, -1)
        queries = theta @ feats
        cols = []
        for n in range(h * w):
            logits = queries[:, n] @ keys  # (N/4,)
            weights = torch.exp(logits - logits.max())
            weights = weights / weights.sum()
            cols.append(vals @ weights)
        attended = torch.stack(cols, dim=1)  # (C/2, N)
        out[i] = (module.gamma * (o @ attended) + feats).reshape(c, h, w)
    return out


def test_attention_matches_naive_softmax_qk_v():
    torch.manual_seed(0)
    for sn in (False, True):
        module = SelfAttention(16, sn=sn).eval()  # eval: SN weights fixed between calls
        with torch.no_grad():
            module.gamma.fill_(0.7)
            x = torch.randn(2, 16, 6, 4, dtype=torch.float64)
            module.double()
            expected = _naive_attention(module, x)
            fast = module(x)
            explicit, _ = module(x, return_attn=True)
        torch.testing.assert_close(fast, expected)
        torch.testing.assert_close(explicit, expected)


def test_conditional_batchnorm_uses_per_class_gain_and_bias():
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    with torch.no_grad():
        cbn.gain.weight[1] = 1.0  # class 1: gain 2
        cbn.bias.weight[2] = 0.5  # class 2: bias 0.5
    x = torch.randn(6, 4, 3, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    normed = F.batch_norm(x, None, None, training=True)
    out = cbn(x, y)
    torch.testing.assert_close(out[0], normed[0])
    torch.testing.assert_close(out[1], 2 * normed[1])
    torch.testing.assert_close(out[2], normed[2] + 0.5)


def test_spectral_norm_matches_torchs_parametrization_in_fp32():
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    from sagan.layers import SN_EPS, snconv2d

    torch.manual_seed(3)
    ours = snconv2d(4, 6)
    torch.manual_seed(3)
    ref = torch_spectral_norm(torch.nn.Conv2d(4, 6, 3, padding=1), eps=SN_EPS)
    torch.nn.init.xavier_uniform_(ref.parametrizations.weight.original)  # same init order as snconv2d
    torch.nn.init.zeros_(ref.bias)
    ours.load_state_dict(ref.state_dict())  # same keys: checkpoints from torch's spectral_norm still load
    x = torch.randn(2, 4, 5, 5)
    for _ in range(3):  # training forwards: one power iteration each
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.parametrizations.weight[0]._u, ref.parametrizations.weight[0]._u, rtol=0, atol=0)


def test_spectral_norm_power_iteration_runs_in_fp32_under_autocast():
    from torch.overrides import TorchFunctionMode

    from sagan.layers import snlinear

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.autocast_on = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.mv, torch.vdot):
                self.autocast_on.append(torch.is_autocast_enabled("cpu"))
            return func(*args, **(kwargs or {}))

    layer = snlinear(8, 4)
    record = Record()
    with torch.autocast("cpu", dtype=torch.bfloat16), record:
        weight = layer.weight
    assert record.autocast_on and not any(record.autocast_on)  # mv (power iteration) and vdot (sigma)
    assert weight.dtype == torch.float32 and layer.parametrizations.weight[0]._u.dtype == torch.float32
    sigma = torch.linalg.matrix_norm(weight.detach(), ord=2).item()
    assert abs(sigma - 1) < 1e-2


def test_attention_gives_the_same_output_with_sdpa_and_with_matmul_softmax():
    from sagan.layers import use_sdpa

    torch.manual_seed(0)
    G = Generator(32, ch=8, z_dim=16, num_classes=3, attn_resolutions=(16,))
    G.attn["1"].gamma.data.fill_(0.7)  # make attention matter
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    G.eval()
    fused = G(z, y)
    use_sdpa(G, False)
    assert G.attn["1"].use_sdpa is False
    torch.testing.assert_close(G(z, y), fused, rtol=1e-5, atol=1e-5)
