"""Finding pretrained weight files on the local disk, and reading them safely.

fedinspect never downloads weights at run time. A backbone names the files it accepts
(:class:`WeightsSpec`); :func:`locate_weights` looks for them, in this order:

1. the path the caller gave (a file, or a folder holding one of the known file names);
2. ``$FEDINSPECT_WEIGHTS_DIR`` (when set), under the backbone's own file names or torchvision's;
3. the torch hub cache ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``),
   where torchvision keeps what it downloads;
4. the Hugging Face cache of timm (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, default
   ``~/.cache/huggingface/hub``), ``models--timm--<model>/snapshots/*/model.safetensors``.

If nothing is found, :class:`~fedinspect.errors.WeightsNotFoundError` lists every place searched
and says where to put the file. Files are read with ``torch.load(weights_only=True)`` or
safetensors: never by unpickling arbitrary objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedinspect.errors import ModelFileError, WeightsNotFoundError

ENV_WEIGHTS_DIR = "FEDINSPECT_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weights of one backbone may be found.

    Attributes:
        backbone: registry name, e.g. ``"wide_resnet50_2"``.
        file_names: names accepted in a folder (``$FEDINSPECT_WEIGHTS_DIR`` or a folder given
            explicitly), in order of preference.
        torch_hub_files: torchvision's file names in the torch hub cache, in order of preference.
        hf_repos: Hugging Face repositories (``"timm/<model>"``) whose cached snapshots hold the weights.
        urls: where the files can be downloaded by hand (only shown in messages; never fetched).
    """

    backbone: str
    file_names: tuple[str, ...]
    torch_hub_files: tuple[str, ...] = ()
    hf_repos: tuple[str, ...] = ()
    hf_file: str = "model.safetensors"
    urls: dict[str, str] = field(default_factory=dict)


def torch_hub_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``, honouring ``XDG_CACHE_HOME`` and ``torch.hub.set_dir``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved the way ``huggingface_hub`` resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_snapshot_files(cache: Path, repo: str, file_name: str) -> tuple[str, list[Path]]:
    """The pattern searched (for messages) and the matching files, the ``refs/main`` snapshot first."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    pattern = str(repo_dir / "snapshots" / "*" / file_name)
    snapshots = repo_dir / "snapshots"
    found = sorted(snapshots.glob(f"*/{file_name}")) if snapshots.is_dir() else []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip() / file_name
        if main in found:
            found.remove(main)
            found.insert(0, main)
    return pattern, found


def _candidates(spec: WeightsSpec) -> Iterator[tuple[str, list[Path]]]:
    """(description of a place searched, files found there) in search order."""
    env_dir = os.environ.get(ENV_WEIGHTS_DIR)
    names = spec.file_names + tuple(n for n in spec.torch_hub_files if n not in spec.file_names)
    if env_dir:
        folder = Path(env_dir).expanduser()
        yield (
            f"${ENV_WEIGHTS_DIR} = {folder} (file names: {', '.join(names)})",
            [folder / n for n in names],
        )
    else:
        yield f"${ENV_WEIGHTS_DIR} (not set)", []
    if spec.torch_hub_files:
        hub = torch_hub_checkpoints_dir()
        yield (
            f"torch hub cache {hub} (file names: {', '.join(spec.torch_hub_files)})",
            [hub / n for n in spec.torch_hub_files],
        )
    if spec.hf_repos:
        cache = hf_hub_cache_dir()
        for repo in spec.hf_repos:
            pattern, found = _hf_snapshot_files(cache, repo, spec.hf_file)
            yield f"Hugging Face cache {pattern}", found


def locate_weights(spec: WeightsSpec, explicit: str | Path | None = None) -> Path:
    """The weight file for ``spec``: ``explicit`` if given, else the first file found (see module doc).

    Raises:
        WeightsNotFoundError: ``explicit`` does not exist, or nothing was found anywhere.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_dir():
            names = spec.file_names + spec.torch_hub_files
            for name in names:
                if (path / name).is_file():
                    return path / name
            raise WeightsNotFoundError(
                f"{path}: no weight file for {spec.backbone} in this folder (looked for: {', '.join(names)})"
            )
        if not path.is_file():
            raise WeightsNotFoundError(f"{path}: weight file for {spec.backbone} does not exist")
        return path

    searched = []
    for place, files in _candidates(spec):
        searched.append(place)
        for f in files:
            if f.is_file():
                return f
    raise WeightsNotFoundError(_not_found_message(spec, searched))


def _not_found_message(spec: WeightsSpec, searched: list[str]) -> str:
    lines = [
        f"No pretrained weights for backbone {spec.backbone!r} were found, and fedinspect never "
        "downloads weights at run time (nor runs a backbone with random weights).",
        "Searched, in order:",
        *(f"  - {place}" for place in searched),
        "To fix, do one of:",
    ]
    if spec.torch_hub_files:
        name = spec.torch_hub_files[0]
        url = spec.urls.get(name)
        hub = torch_hub_checkpoints_dir()
        lines.append(
            f"  - put torchvision's file {name} into {hub}/ (i.e. {hub / name})"
            + (f"; it can be downloaded on any machine from {url}" if url else "")
        )
    lines.append(
        f"  - or set {ENV_WEIGHTS_DIR} to a folder and put the weights there as "
        f"{' or '.join(spec.file_names)} (.pth state dict or .safetensors)"
    )
    lines.append(f"  - or pass the file explicitly: get_backbone({spec.backbone!r}, weights='/path/to/file')")
    return "\n".join(lines)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from a ``.safetensors`` file or a ``.pth`` file (``weights_only=True``).

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Raises:
        ModelFileError: the file cannot be read or holds something other than named tensors.
    """
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with objects other than tensors, ...
        raise ModelFileError(f"{path}: cannot read weights: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFileError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return dict(state)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        return False
    # Unknown suffix: a safetensors file starts with an 8-byte header length, then a JSON object.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"
