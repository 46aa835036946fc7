"""Backbones by name: a registry of factories that build pretrained feature extractors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from fedinspect.backbones.extractor import FeatureExtractor

DEFAULT_BACKBONE = "efficientnet_lite0"


class BackboneFactory(Protocol):
    def __call__(
        self, weights: str | Path | None = None, layers: Sequence[str] | None = None
    ) -> FeatureExtractor: ...


_FACTORIES: dict[str, BackboneFactory] = {}
_ARCHITECTURES: dict[str, Callable[[Sequence[str] | None], FeatureExtractor]] = {}


def _canonical(name: str) -> str:
    """``"EfficientNet-Lite0"`` and ``"efficientnet_lite0"`` name the same backbone."""
    return name.strip().lower().replace("-", "_")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator that registers ``factory(weights=None, layers=None) -> FeatureExtractor`` as ``name``.

    Raises ValueError if ``name`` is already registered.
    """
    key = _canonical(name)

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if key in _FACTORIES:
            raise ValueError(f"backbone {key!r} is already registered")
        _FACTORIES[key] = factory
        return factory

    return decorator


def register_architecture(
    name: str,
) -> Callable[[Callable[[Sequence[str] | None], FeatureExtractor]], Callable[[Sequence[str] | None], FeatureExtractor]]:
    """Decorator that registers ``build(layers) -> FeatureExtractor`` (randomly initialised) as ``name``."""
    key = _canonical(name)

    def decorator(build: Callable[[Sequence[str] | None], FeatureExtractor]) -> Callable:
        if key in _ARCHITECTURES:
            raise ValueError(f"architecture {key!r} is already registered")
        _ARCHITECTURES[key] = build
        return build

    return decorator


def untrained_backbone(name: str = DEFAULT_BACKBONE, layers: Sequence[str] | None = None) -> FeatureExtractor:
    """The architecture of backbone ``name``, randomly initialised (seed torch first) and trainable.

    A distillation student (STFPM) is one: it returns the same named maps as the pretrained teacher
    but never loads ImageNet weights. Raises ValueError for an unknown backbone or layer name.
    """
    key = _canonical(name)
    if key not in _ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[key](layers).make_trainable()


def available_backbones() -> list[str]:
    """Names accepted by :func:`get_backbone`, sorted."""
    return sorted(_FACTORIES)


def get_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    layers: Sequence[str] | None = None,
) -> FeatureExtractor:
    """Builds the pretrained feature extractor ``name``, frozen and in eval mode.

    Args:
        name: a name from :func:`available_backbones`.
        weights: a weight file to load instead of the one the backbone finds by itself.
        layers: which feature maps to return (default: the backbone's own choice).

    Raises:
        ValueError: unknown backbone or layer name.
        WeightsNotFoundError: no weight file could be found; there is never a fallback to random weights.
        ModelFileError: the weight file does not fit the architecture.
    """
    key = _canonical(name)
    if key not in _FACTORIES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    extractor = _FACTORIES[key](weights=weights, layers=layers)
    extractor.freeze()
    return extractor
