"""Numerics of the PEL building blocks against references."""
import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from PIL import Image

from pel_model.layers import (ChannelAttention, FrequencyInput, MutualEnhancement, NoiseEnhancement,
                              SlidingDCT, median3x3, rgb_to_ycbcr)


def test_sliding_dct_matches_scipy_at_positions_including_borders():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64) * 255
    out = SlidingDCT(3).double()(x)
    assert out.shape == (1, 192, 16, 20)
    padded = F.pad(x, (3, 3, 3, 3)).numpy()[0]
    for p, q in [(0, 0), (0, 19), (15, 0), (15, 19), (7, 9), (3, 12)]:
        for c in range(3):
            ref = scipy.fft.dctn(padded[c, 2 * p:2 * p + 8, 2 * q:2 * q + 8], norm="ortho")
            got = out[0, c * 64:(c + 1) * 64, p, q].numpy().reshape(8, 8)
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)  # float32 basis, values up to 2040


@pytest.mark.parametrize("size", [224, 320])
def test_frequency_input_is_half_resolution_with_64_channels(size):
    out = FrequencyInput(64)(torch.rand(2, 3, size, size) * 255)
    assert out.shape == (2, 64, size // 2, size // 2)


def test_ycbcr_matches_pil_jpeg_convention():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).convert("YCbCr")).astype(np.float64)
    got = rgb_to_ycbcr(torch.from_numpy(img).permute(2, 0, 1)[None].double())[0].permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() <= 1.0 + 1e-3  # PIL rounds to integers


def _median_reference(x):
    n, c, h, w = x.shape
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    patches = F.unfold(p.reshape(n * c, 1, h + 2, w + 2), 3).reshape(n, c, 9, h, w)
    return patches.median(dim=2).values


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 5, 1, 4), (1, 2, 3, 3), (1, 1, 2, 2), (2, 2, 7, 2)])
def test_median_sorting_network_is_bit_exact_including_borders(shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    x[..., 0, 0] = x[..., 0, 1]  # ties
    assert torch.equal(median3x3(x), _median_reference(x))


def test_median_is_exact_on_every_binary_window():
    # Min/max networks commute with monotone maps (the 0-1 principle): exact on all 2^9 binary
    # 3x3 windows means exact on every input. The centre pixel of each 3x3 image sees no padding.
    bits = (torch.arange(512).unsqueeze(1) >> torch.arange(9)) & 1
    x = bits.float().reshape(512, 1, 3, 3)
    assert torch.equal(median3x3(x)[:, 0, 1, 1], (bits.sum(1) >= 5).float())


def test_median_with_many_ties_and_integers():
    x = torch.randint(0, 3, (2, 4, 8, 8)).float()
    assert torch.equal(median3x3(x), _median_reference(x))


def test_noise_enhancement_formula():
    torch.manual_seed(2)
    m = NoiseEnhancement(6)
    torch.nn.init.normal_(m.dwconv.weight)
    torch.nn.init.normal_(m.dwconv.bias)
    f = torch.randn(2, 6, 10, 10)
    s = torch.sigmoid(f - _median_reference(f))
    ref = f + s * m.dwconv.weight.view(1, 6, 1, 1) + m.dwconv.bias.view(1, 6, 1, 1)
    torch.testing.assert_close(m(f), ref)


def test_noise_and_mutual_enhancement_start_as_identity():
    f, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    assert torch.equal(NoiseEnhancement(8)(f), f)
    out_f, out_g = MutualEnhancement(8)(f, g)
    assert torch.equal(out_f, f) and torch.equal(out_g, g)


def test_channel_attention_formula():
    torch.manual_seed(3)
    m = ChannelAttention(64, reduction=16)
    assert m.mlp[0].out_channels == 8  # at least 8 hidden units
    f = torch.randn(3, 64, 7, 5)
    w1, b1 = m.mlp[0].weight[:, :, 0, 0], m.mlp[0].bias
    w2, b2 = m.mlp[2].weight[:, :, 0, 0], m.mlp[2].bias
    v = f.mean((2, 3)) + f.flatten(2).max(-1).values
    a = torch.sigmoid(torch.relu(v @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(m(f), f + f * a[:, :, None, None])


def test_mutual_enhancement_formula():
    torch.manual_seed(4)
    m = MutualEnhancement(4)
    for conv in (m.dw_rgb, m.dw_freq):
        torch.nn.init.normal_(conv.weight)
        torch.nn.init.normal_(conv.bias)
    fr, ff = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    w, b = m.attention.weight[:, :, 0, 0], m.attention.bias
    a = torch.sigmoid(torch.einsum("oc,nchw->nohw", w, torch.cat((fr, ff), 1)) + b.view(1, 2, 1, 1))

    def dw(conv, x):
        return x * conv.weight.view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1)

    out_r, out_f = m(fr, ff)
    torch.testing.assert_close(out_r, fr + dw(m.dw_rgb, fr * a[:, :1]))
    torch.testing.assert_close(out_f, ff + dw(m.dw_freq, ff * a[:, 1:]))
