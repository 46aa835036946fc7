"""What every saved detector shares: its settings file, the hash of its backbone weights, the image-size floor.

A model folder comes from elsewhere and is untrusted: these checks turn every problem into a
:class:`~fedinspect.errors.ModelFileError` naming the file, and never let the folder choose a file to open.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors

from fedinspect.errors import ModelFileError, SettingsError

# Smallest short side accepted: a few cells of the coarsest feature map (stride 16 or 32); smaller
# images give a bank of one or two patches that scores nothing.
MIN_IMAGE_SIZE = 32


def check_image_size(image_size: Any) -> int:
    """``image_size`` if it is an integer of at least :data:`MIN_IMAGE_SIZE` pixels, else SettingsError."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise SettingsError(f"image size must be an integer of at least {MIN_IMAGE_SIZE} px, got {image_size!r}")
    return image_size


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (identifies a backbone's weights without naming their path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """A settings file's JSON, or ModelFileError saying why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read settings file ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: corrupt settings file ({error})") from error


def read_settings(path: Path, model_format: str) -> dict[str, Any]:
    """A detector's settings file: a JSON object of ``model_format`` with a ``params`` object."""
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != model_format:
        found = config.get("format") if isinstance(config, dict) else None
        raise ModelFileError(f"{path}: format {found!r}, expected {model_format!r}")
    if not isinstance(config.get("params"), dict):
        raise ModelFileError(f"{path}: no 'params' object (the detector's settings)")
    return config


def constructor_params(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The detector's constructor parameters; a settings file that names a weights file is refused."""
    params = dict(config["params"])
    if params.pop("weights", None) is not None:
        raise ModelFileError(f"{path}: names a weights file; a model file may not choose a file to "
                             "open: pass the backbone's weights on the command line (--weights FILE)")
    return params


def check_weights(config: dict[str, Any], config_path: Path, weights_path: Path) -> None:
    """The backbone's weights file must be the one the model was fitted with."""
    expected = config.get("weights_sha256")
    if not isinstance(expected, str):
        raise ModelFileError(f"{config_path}: no weights_sha256 (written by an older fedinspect, or edited): refit")
    found = file_sha256(weights_path)
    if found != expected:
        raise ModelFileError(
            f"{config_path}: fitted with backbone weights of SHA-256 {expected[:16]}..., but {weights_path} has "
            f"{found[:16]}...: pass the weights file the model was fitted with (--weights FILE)"
        )


def read_tensors(path: Path, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]], what: str = "tensors"
                 ) -> dict[str, np.ndarray]:
    """A safetensors file holding exactly the ``expected`` names, each of its shape and dtype (never cast).

    Floating-point tensors must be finite. Anything else is a ModelFileError naming the file and tensor.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read {what} ({error.strerror})") from error
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as error:
        raise ModelFileError(f"{path}: corrupt {what} file ({type(error).__name__}: {error})") from error
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelFileError(f"{path}: unexpected tensors {unexpected[:5]} (written for another architecture?)")
    arrays = {}
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{path}: no '{name}' tensor")
        array = tensors[name]
        if array.dtype != dtype:
            raise ModelFileError(f"{path}: '{name}' is {array.dtype}, expected {np.dtype(dtype)}")
        if tuple(array.shape) != tuple(shape):
            raise ModelFileError(f"{path}: '{name}' has shape {list(array.shape)}, expected {list(shape)} "
                                 "(the settings recorded beside it)")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ModelFileError(f"{path}: '{name}' contains NaN or infinite values")
        arrays[name] = np.ascontiguousarray(array)
    return arrays
