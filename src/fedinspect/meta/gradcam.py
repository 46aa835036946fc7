"""Grad-CAM (Selvaraju et al., ICCV 2017) for the "defective" logit of a pair model (seed 002, Fig. 5).

The maps A^k of a chosen layer are weighted by the spatial mean of d logit / d A^k; the ReLU of the weighted sum is
upsampled (bilinear) to the input size and divided by its maximum, so each map lies in [0, 1] (all zeros where
nothing argues for "defective").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.meta.model import check_pair


def grad_cam(model: nn.Module, reference: torch.Tensor, test: torch.Tensor,
             layer: str | nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps (n, H, W) in [0, 1] of ``model(reference, test)``'s logits at ``layer``.

    Args:
        model: returns (n,) logits of "defective" from ``(reference, test)``, e.g. a MeDetectionNet.
        layer: a submodule or its name; default ``model.cam_layer`` (MeDetectionNet: the ReLU of the last conv
            block). It must run once per forward on the n pairs: a layer of the shared Siamese stem sees 2n images
            and is refused.
    """
    check_pair(reference, test)
    if layer is None:
        layer = getattr(model, "cam_layer", None)
        if layer is None:
            raise ValueError(f"grad_cam: {type(model).__name__} has no cam_layer; pass layer=")
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError as exc:
            raise ValueError(f"grad_cam: {type(model).__name__} has no layer {layer!r}") from exc
    elif isinstance(layer, nn.Module):
        module = layer
    else:
        raise ValueError(f"grad_cam: layer must be a name or a module, got {type(layer).__name__}")
    n, height, width = test.shape[0], test.shape[2], test.shape[3]
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.retain_grad()
        captured.append(output)

    handle = module.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(reference.detach(), test.detach())
            if len(captured) != 1 or captured[0].ndim != 4 or captured[0].shape[0] != n:
                shapes = [tuple(a.shape) for a in captured]
                raise ValueError(f"grad_cam: layer {layer!r} must give one (n={n}, C, h, w) map per forward, got "
                                 f"{shapes}; choose a layer after the Siamese difference")
            if logits.shape != (n,):
                raise ValueError(f"grad_cam: the model must return (n,) logits, got {tuple(logits.shape)}")
            activation = captured[0]
            if not activation.requires_grad:
                raise ValueError(f"grad_cam: layer {layer!r} is not on a path with trainable parameters")
            (gradient,) = torch.autograd.grad(logits.sum(), activation)
    finally:
        handle.remove()
        model.train(was_training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False).squeeze(1).clamp_min(0)
    peak = cam.flatten(1).amax(dim=1).view(n, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
