"""CFLOW-AD (Gudovskiy et al., WACV 2022): conditional normalizing flows on a frozen encoder's features.

Each feature vector (a "fiber") at each scale is mapped by an invertible flow, conditioned on a 2D
sinusoidal encoding of its position, to a standard normal; training maximises the likelihood of the
good images' fibers. A position is anomalous where its fiber is unlikely.

The coupling blocks are written here, not taken from FrEIA: FrEIA's ``AllInOneBlock`` draws its
permutations from NumPy's global random state, which our seed does not govern; ours draw them from
torch's seeded generator, and the whole flow is 60 lines whose log-determinant is checked in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.backbones.extractor import FeatureExtractor
from fedinspect.backbones.runtime import DEFAULT_RUNTIME
from fedinspect.detectors.distillation import build_teacher, check_backbone_settings
from fedinspect.detectors.trained_detector import (
    TrainedDetector,
    _check_positive_float,
    _check_positive_int,
    checked_runtime,
)
from fedinspect.errors import SettingsError

LOG_2PI = math.log(2 * math.pi)


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, height, width) sine/cosine harmonics of the position, as in the CFLOW paper (Eqs. 4.9-4.10).

    The first half of the channels encode the column, the second half the row; ``channels`` must be a
    multiple of 4.
    """
    if channels % 4:
        raise SettingsError(f"condition_vector must be a multiple of 4, got {channels}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(1e4) / half))
    columns = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # (W, half/2)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # (H, half/2)
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding


class ConditionalCoupling(nn.Module):
    """One affine coupling block: a learned per-dimension affine, then half the dimensions scaled and
    shifted by a subnetwork of the other half and the condition, then a fixed random permutation.

    The scales are soft-clamped to ``(-clamp, clamp)`` (``2/pi * clamp * atan(s / clamp)``, FrEIA's
    AllInOneBlock) so that training stays stable. ``forward`` returns the output and log|det J| per row.
    """

    def __init__(self, dim: int, condition: int, clamp: float) -> None:
        super().__init__()
        self.clamp = clamp
        self.split = dim // 2
        inputs = self.split + condition
        self.subnet = nn.Sequential(nn.Linear(inputs, 2 * inputs), nn.ReLU(),
                                    nn.Linear(2 * inputs, 2 * (dim - self.split)))
        nn.init.zeros_(self.subnet[-1].weight)  # every block starts as the identity
        nn.init.zeros_(self.subnet[-1].bias)
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.register_buffer("permutation", torch.randperm(dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * torch.exp(self.log_scale) + self.shift
        kept, changed = x[:, :self.split], x[:, self.split:]
        scale, shift = self.subnet(torch.cat([kept, condition], dim=1)).chunk(2, dim=1)
        scale = (2 / math.pi) * self.clamp * torch.atan(scale / self.clamp)
        y = torch.cat([kept, changed * torch.exp(scale) + shift], dim=1)[:, self.permutation]
        return y, scale.sum(dim=1) + self.log_scale.sum()


class ConditionalFlow(nn.Module):
    """A sequence of :class:`ConditionalCoupling` blocks: fibers (N, dim) -> (N, dim) with log|det J| (N,)."""

    def __init__(self, dim: int, condition: int, blocks: int, clamp: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConditionalCoupling(dim, condition, clamp) for _ in range(blocks))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det

    def log_likelihood(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """log p(x | condition) per row: standard normal log-density of the output plus log|det J|."""
        u, log_det = self(x, condition)
        return -0.5 * (u.pow(2).sum(dim=1) + u.shape[1] * LOG_2PI) + log_det


class CflowModule(nn.Module):
    """The frozen encoder (``teacher``) and one conditional flow per scale.

    ``reference`` holds, per scale, the highest per-dimension log-likelihood seen on the good images
    (set by :meth:`Cflow._calibrate`); the maps turn log-likelihoods into likelihoods relative to it.
    """

    def __init__(self, teacher: FeatureExtractor, condition: int, blocks: int, clamp: float) -> None:
        super().__init__()
        self.teacher = teacher
        self.condition = condition
        self.flows = nn.ModuleList(ConditionalFlow(teacher.channels[layer], condition, blocks, clamp)
                                   for layer in teacher.layers)
        self.register_buffer("reference", torch.zeros(len(teacher.layers)))

    def fibers(self, images: torch.Tensor, maps: dict[str, torch.Tensor] | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per scale: fibers (B*h*w, C), their positional conditions (B*h*w, condition) and (h, w).

        ``maps``: the teacher's maps of ``images`` if already computed (by a faster runtime), else torch's.
        """
        if maps is None:
            with torch.no_grad():
                maps = self.teacher(images)
        out = []
        for layer in self.teacher.layers:
            features = maps[layer]
            batch, channels, height, width = features.shape
            encoding = positional_encoding_2d(self.condition, height, width).to(features)
            condition = encoding.reshape(self.condition, -1).T.repeat(batch, 1)
            out.append((features.permute(0, 2, 3, 1).reshape(-1, channels), condition, (height, width)))
        return out

    def log_likelihood_maps(self, images: torch.Tensor, teacher: dict[str, torch.Tensor] | None = None
                            ) -> list[torch.Tensor]:
        """Per scale, (B, h, w) log-likelihood per feature dimension of every position (``teacher``: as
        :meth:`fibers`'s ``maps``)."""
        maps = []
        for flow, (x, condition, (height, width)) in zip(self.flows, self.fibers(images, teacher), strict=True):
            maps.append((flow.log_likelihood(x, condition) / x.shape[1]).reshape(-1, height, width))
        return maps


class Cflow(TrainedDetector):
    """CFLOW-AD on a frozen EfficientNet-Lite0, one conditional flow per scale.

    Training: each step extracts the features of a batch of good images, draws ``fiber_batch`` random
    positions per scale (the paper's fiber batches) and minimises their negative log-likelihood per
    dimension. Map: per scale, the likelihood ``exp(log p - reference)`` (``reference``: the highest
    log-likelihood per dimension on the good images after training, a fixed stand-in for the paper's
    maximum over the test set, so a score does not depend on the other images of its batch), upsampled
    bilinearly to the input, summed over scales and subtracted from the number of scales: higher = more
    anomalous, about 0 where a position is as likely as the likeliest good one.

    Defaults (sized for a 2-core CPU): EfficientNet-Lite0 scales stride8 and stride16 (40 and 112
    channels; the analogue of the paper's WRN50 layer2 + layer3), 8 coupling blocks, clamp 1.9,
    condition vector 128, fiber batch 2048 per scale and step, Adam at 1e-3, batch 8, at most 20 epochs with
    patience 5 on a 10% validation split, image_size 256, map smoothing sigma 4. ``runtime`` (default
    ``"openvino"``; ``"onnx"``, ``"torch"``, ``"openvino-bf16"``) runs the frozen encoder on the CPU, see
    :mod:`fedinspect.backbones.runtime`; the flows train in torch whatever it is.
    Paper: WRN50 encoder with 3 scales (layer1-3), 8 coupling blocks, clamp 1.9, condition vector 128,
    fiber batch 256 with one step per fiber batch (every position of every image used each epoch), Adam
    at 2e-4 with warm-up and cosine decay, ~100 meta-epochs, 256x256 (MVTec). The seed trained 300 epochs
    at lr 0.01 on 256x256 images.
    """

    name = "cflow"
    model_format = "fedinspect.cflow/1"
    input_multiple = 32
    frozen_prefixes = ("teacher.",)
    dp_sgd_refusal = (
        "its loss draws fiber_batch feature vectors from all the images of a batch together, and Opacus sees each "
        "fiber (not each image) as a sample, so per-sample clipping would not bound one image's influence (an image "
        "gives up to h*w fibers); and the reference log-likelihood is calibrated on the training images after "
        "training, outside DP-SGD"
    )

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stride8", "stride16"),
        weights: str | None = None,
        runtime: str = DEFAULT_RUNTIME,
        coupling_blocks: int = 8,
        condition_vector: int = 128,
        clamp_alpha: float = 1.9,
        fiber_batch: int = 2048,
        image_size: int = 256,
        epochs: int = 20,
        learning_rate: float = 1e-3,
        batch_size: int = 8,
        patience: int = 5,
        validation_fraction: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         patience=patience, validation_fraction=validation_fraction, sigma=sigma, seed=seed,
                         progress=progress)
        check_backbone_settings(backbone, layers, weights)
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = None if weights is None else str(weights)
        self.runtime = checked_runtime(runtime)
        self.coupling_blocks = _check_positive_int("coupling_blocks", coupling_blocks)
        self.condition_vector = _check_positive_int("condition_vector", condition_vector, minimum=4)
        if condition_vector % 4:
            raise SettingsError(f"condition_vector must be a multiple of 4 (sine and cosine of row and column), "
                                f"got {condition_vector}")
        self.clamp_alpha = _check_positive_float("clamp_alpha", clamp_alpha)
        self.fiber_batch = _check_positive_int("fiber_batch", fiber_batch)

    def _build_module(self) -> nn.Module:
        teacher = build_teacher(self.backbone, self.layers, self.weights)
        return CflowModule(teacher, self.condition_vector, self.coupling_blocks, self.clamp_alpha)

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        losses = []
        fibers = module.fibers(images, self._teacher_maps(module, images))
        for flow, (x, condition, _) in zip(module.flows, fibers, strict=True):
            chosen = torch.randperm(x.shape[0], generator=generator)[:self.fiber_batch].to(x.device)
            losses.append(-flow.log_likelihood(x[chosen], condition[chosen]).mean() / x.shape[1])
        return torch.stack(losses).mean()

    def _calibrate(self, module: nn.Module, images: list[torch.Tensor]) -> None:
        best = torch.full_like(module.reference, -math.inf)
        for batch in self._shape_batches(images, range(len(images))):
            x = torch.stack([images[i] for i in batch]).to(best.device)
            maps = module.log_likelihood_maps(x, self._teacher_maps(module, x))
            best = torch.maximum(best, torch.stack([m.max() for m in maps]))
        module.reference.copy_(best)

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        likelihood = images.new_zeros(images.shape[0], *size)
        log_likelihoods = module.log_likelihood_maps(images, self._teacher_maps(module, images))
        for log_p, reference in zip(log_likelihoods, module.reference, strict=True):
            scale = torch.exp(log_p - reference)[:, None]
            likelihood += F.interpolate(scale, size=size, mode="bilinear", align_corners=False)[:, 0]
        return len(module.flows) - likelihood
