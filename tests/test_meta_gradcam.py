"""Grad-CAM: a model whose answer depends on one known region gets that region highlighted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedinspect.meta.gradcam import grad_cam
from fedinspect.meta.model import MeDetectionNet


class QuadrantModel(nn.Module):
    """Two feature channels at half resolution: channel 0 sees only the top-left quadrant, channel 1 only the
    bottom-right one. The logit is the mean of channel 0, so only the top-left quadrant matters."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        half = size // 2
        masks = torch.zeros(2, half, half)
        masks[0, : half // 2, : half // 2] = 1
        masks[1, half // 2:, half // 2:] = 1
        self.register_buffer("masks", masks)
        self.pool = nn.AvgPool2d(2)
        self.features = nn.Identity()

    def forward(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        brightness = self.pool(test.mean(dim=1, keepdim=True))  # (n, 1, size/2, size/2)
        maps = self.features(brightness * self.masks * self.scale.view(1, 2, 1, 1))
        return maps[:, 0].mean(dim=(1, 2))


def test_grad_cam_highlights_the_region_the_answer_depends_on():
    size = 32
    model = QuadrantModel(size)
    test = torch.ones(2, 3, size, size)  # bright everywhere: both channels respond
    cam = grad_cam(model, torch.zeros_like(test), test, layer="features")
    assert cam.shape == (2, size, size)
    assert float(cam.min()) >= 0 and float(cam.max()) == pytest.approx(1.0)
    quadrant = size // 2
    inside = cam[:, 2:quadrant - 2, 2:quadrant - 2]
    assert float(inside.min()) == pytest.approx(1.0)
    outside = cam.clone()
    outside[:, : quadrant + 2, : quadrant + 2] = 0  # the quadrant and a 2-pixel band of bilinear spill
    assert float(outside.max()) == pytest.approx(0.0)
    assert float(cam[:, quadrant + 2:, quadrant + 2:].max()) == pytest.approx(0.0)  # channel 1 responds but is ignored
    # the same layer given as a module
    torch.testing.assert_close(grad_cam(model, torch.zeros_like(test), test, layer=model.features), cam)


def test_grad_cam_on_medetection_is_a_map_in_unit_range():
    torch.manual_seed(0)
    model = MeDetectionNet("both", width=8)
    model.train()
    reference, test = torch.randn(3, 3, 32, 48), torch.randn(3, 3, 32, 48)
    cam = grad_cam(model, reference, test)
    assert cam.shape == (3, 32, 48)
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())
    # zero difference: the map does not depend on the images (the trunk sees zeros either way)
    torch.testing.assert_close(grad_cam(model, reference, reference), grad_cam(model, test, test))
    assert not torch.allclose(cam, grad_cam(model, test, test))


def test_grad_cam_refuses_bad_layers():
    model = MeDetectionNet("none", width=8)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        grad_cam(model, images, images, layer="nope")
    with pytest.raises(ValueError, match="after the Siamese difference"):
        grad_cam(model, images, images, layer="stem.0")  # the shared stem runs on 2n images
    with pytest.raises(ValueError, match="layer must be a name or a module"):
        grad_cam(model, images, images, layer=3)
    with pytest.raises(ValueError, match="differ in shape"):
        grad_cam(model, images, images[:1])
