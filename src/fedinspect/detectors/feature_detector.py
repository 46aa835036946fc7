"""The part PatchCore and PaDiM share: the backbone's patch features, built on first use, and the letterbox.

Both estimators score :class:`~fedinspect.detectors.patch_features.PatchFeatures`; a subclass sets
``backbone``, ``weights``, ``layers``, ``image_size``, ``runtime`` and ``_features = None`` in its ``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedinspect.backbones import get_backbone, with_runtime
from fedinspect.detectors.patch_features import PatchFeatures
from fedinspect.detectors.preprocessing import Letterbox


class FeatureDetector:
    """A detector on backbone patch features (see the module docstring for what a subclass provides)."""

    backbone: str
    weights: str | None
    layers: Sequence[str] | None
    image_size: int
    runtime: str  # "torch", "onnx", "openvino" or "openvino-bf16" (fedinspect.backbones.RUNTIMES)
    _features: PatchFeatures | None
    keep_aspect_ratio: bool = True  # a subclass may take it as a parameter (PaDiM)

    @property
    def features(self) -> PatchFeatures:
        """The patch feature model, built on first use: the BatchNorm-fused backbone run by ``runtime``."""
        if self._features is None:
            extractor = get_backbone(self.backbone, weights=self.weights, layers=self.layers)
            self._features = PatchFeatures(with_runtime(extractor.fuse_batchnorm(), self.runtime))
        return self._features

    @property
    def letterbox(self) -> Letterbox:
        """Resizes the short side to ``image_size`` and pads to the coarsest stride (no squashing unless
        ``keep_aspect_ratio`` is False)."""
        return Letterbox(short_side=self.image_size, multiple=max(self.features.extractor.strides.values()),
                         square=not self.keep_aspect_ratio)
