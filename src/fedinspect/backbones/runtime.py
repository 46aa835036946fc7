"""The frozen backbone run by onnxruntime or OpenVINO instead of torch eager: same maps, 2-4x faster on CPU.

>>> from fedinspect.backbones import BackboneRuntime, get_backbone
>>> runtime = BackboneRuntime(get_backbone().fuse_batchnorm(), "openvino")
>>> maps = runtime(images)          # same face as the extractor: (B, 3, H, W) in [0, 1] -> {layer: (B, C, h, w)}

Runtimes (:data:`RUNTIMES`): ``"torch"`` (the extractor itself), ``"onnx"`` (onnxruntime, fp32),
``"openvino"`` (OpenVINO, ``INFERENCE_PRECISION_HINT=f32`` set explicitly: its default on CPUs with bf16
units silently computes in bf16) and ``"openvino-bf16"`` (an explicit lower precision: its load-time gate is
a per-layer cosine of :data:`BF16_MIN_COSINE` on the probe image; on real metal plates the cosine was 0.993
and PatchCore's image AUROC and AUC-sPRO@0.05 moved by 5e-4 and 3e-4, see ``benchmarks/bench_runtime.py``).

Export: the "same" padding of EfficientNet-Lite is computed from the input size in Python, so a graph is
traced per input height x width (the batch stays dynamic). torch 2.13's TorchScript exporter
(``dynamo=False``) is used: the dynamo exporter takes 7 s per static shape here and did not finish in
10 minutes with symbolic height and width. One ONNX file per (backbone, layers, H, W, weights SHA-256,
runtime, precision, torch version) is cached in :func:`cache_dir` (``$FEDINSPECT_CACHE``, default
``~/.cache/fedinspect/runtime``), written atomically (temporary file + rename) with a JSON sidecar holding
its key and SHA-256.

Nothing in the cache is trusted: a file whose sidecar is missing, unreadable, of another key or of another
SHA-256, that the runtime cannot load, or whose maps on a seeded probe image differ from torch's, is
exported again with a warning. A fresh export that still differs from torch raises RuntimeError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedinspect.backbones.extractor import FeatureExtractor, LayerSpec
from fedinspect.quiet_warnings import ignoring

RUNTIMES = ("torch", "onnx", "openvino", "openvino-bf16")
DEFAULT_RUNTIME = "openvino"
ENV_CACHE = "FEDINSPECT_CACHE"
EXPORT_FORMAT = 1  # bump when the exported graph changes for the same key
OPSET = 17
# Probe gates: largest |runtime - torch| relative to the largest |torch| value of a layer (f32 measured:
# 2e-6 for onnxruntime and OpenVINO), and the per-layer cosine of bf16 (measured 0.9990-0.9997).
F32_MAX_RELATIVE_DIFF = 1e-4
BF16_MIN_COSINE = 0.995


def check_runtime(runtime: Any) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else ValueError listing them."""
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choices: {', '.join(RUNTIMES)}")
    return runtime


def cache_dir(directory: str | Path | None = None) -> Path:
    """Where exported graphs live: ``directory``, else ``$FEDINSPECT_CACHE``, else ``~/.cache/fedinspect/runtime``."""
    if directory is not None:
        return Path(directory).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path("~/.cache/fedinspect/runtime").expanduser()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(extractor: FeatureExtractor) -> str:
    """SHA-256 of the extractor's weight file (as saved models record it); of its tensors if it has no file."""
    if extractor.weights_path is not None:
        path = Path(extractor.weights_path)
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _FILE_HASHES:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            _FILE_HASHES[memo] = digest.hexdigest()
        return _FILE_HASHES[memo]
    digest = hashlib.sha256()
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return "tensors:" + digest.hexdigest()


def export_key(extractor: FeatureExtractor, height: int, width: int, runtime: str) -> dict[str, Any]:
    """Everything the exported file depends on (its cache key)."""
    check_runtime(runtime)
    base, _, precision = runtime.partition("-")
    return {
        "format": EXPORT_FORMAT,
        "backbone": extractor.name,
        "layers": list(extractor.layers),
        "height": int(height),
        "width": int(width),
        "weights_sha256": weights_sha256(extractor),
        "runtime": base,
        "precision": precision or "f32",
        "torch": torch.__version__,
        "opset": OPSET,
    }


def _key_name(key: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{key['backbone']}-{key['height']}x{key['width']}-{key['runtime']}-{key['precision']}-{digest}"


class _Graph(nn.Module):
    """The extractor with a tuple output (what the exporter needs), maps in ``layers`` order."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.extractor(images)
        return tuple(maps[k] for k in self.extractor.layers)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _export_onnx(extractor: FeatureExtractor, height: int, width: int) -> bytes:
    """The ONNX bytes of ``extractor`` at input ``height`` x ``width``, batch dynamic."""
    handle, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(handle)
    graph = _Graph(extractor).eval()
    names = [f"map_{k}" for k in extractor.layers]
    try:
        # The TorchScript exporter's deprecation notices, its note on constant folding and the tracer's
        # warnings about Python ints in the padding: all expected, the shape being fixed per export.
        with ignoring(torch.jit.TracerWarning, DeprecationWarning), ignoring(UserWarning, message="Constant folding"), \
                torch.no_grad():
            torch.onnx.export(graph, (torch.zeros(1, 3, height, width),), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=names,
                              dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        return Path(tmp).read_bytes()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@dataclass
class _Session:
    """A loaded graph at one input shape and thread count."""

    run: Any  # numpy (B, 3, H, W) float32 -> list of numpy maps in layers order


def _onnx_session(model: bytes, threads: int) -> _Session:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return _Session(run=lambda x: session.run(None, {"images": x}))


def _openvino_session(model: bytes, threads: int, precision: str) -> _Session:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:  # read_model takes ONNX from a path
        path = Path(folder) / "model.onnx"
        path.write_bytes(model)
        network = core.read_model(str(path))
    compiled = core.compile_model(network, "CPU", {
        "INFERENCE_PRECISION_HINT": precision,  # explicit: the CPU default may be bf16
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,  # shared machines, federated clients in one host: never pin cores
    })
    found = compiled.get_property("INFERENCE_PRECISION_HINT")
    if found != {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]:
        raise RuntimeError(f"OpenVINO compiled with precision {found}, asked for {precision}")
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x})
        return [np.array(result[o], copy=True) for o in outputs]  # the request reuses its buffers

    return _Session(run=run)


class BackboneRuntime(nn.Module):
    """A frozen extractor run by ``runtime``: the extractor's face (``layers``, ``strides``, ``channels``,
    ``weights_path``, ``__call__``), so :class:`~fedinspect.detectors.patch_features.PatchFeatures` takes it.

    The torch extractor is kept as a submodule (its parameters count, its metadata is read) and is the
    reference every loaded graph is checked against. Graphs are exported on the first image of each
    height x width, batch dynamic, and loaded once per shape and torch thread count (``NUM_STREAMS=1``,
    threads = ``torch.get_num_threads()``). No autograd: images that require grad are refused.
    """

    def __init__(self, extractor: FeatureExtractor, runtime: str = DEFAULT_RUNTIME,
                 cache: str | Path | None = None) -> None:
        super().__init__()
        if not isinstance(extractor, FeatureExtractor):
            raise ValueError(f"expected a FeatureExtractor, got {type(extractor).__name__}")
        if extractor.trainable:
            raise ValueError(f"{extractor.name}: a runtime runs a frozen extractor; this one is trainable")
        self.runtime = check_runtime(runtime)
        self.torch_extractor = extractor.eval()
        self.cache = None if cache is None else Path(cache)
        self._sessions: dict[tuple[int, int, int], _Session] = {}
        self.exports = 0  # graphs exported by this object (a cache hit exports none)

    # ------------------------------------------------------------------ the extractor's face
    @property
    def name(self) -> str:
        return self.torch_extractor.name

    @property
    def layers(self) -> tuple[str, ...]:
        return self.torch_extractor.layers

    @property
    def strides(self) -> dict[str, int]:
        return self.torch_extractor.strides

    @property
    def channels(self) -> dict[str, int]:
        return self.torch_extractor.channels

    @property
    def available_layers(self) -> dict[str, LayerSpec]:
        return self.torch_extractor.available_layers

    @property
    def weights_path(self) -> Path | None:
        return self.torch_extractor.weights_path

    @property
    def mean(self) -> tuple[float, ...]:
        return self.torch_extractor.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.torch_extractor.std

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, Ray) leave the loaded graphs behind: they are loaded again on first use."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_sessions": {}}

    def train(self, mode: bool = True) -> BackboneRuntime:
        """Always in eval mode (the graphs are frozen)."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"runtime={self.runtime!r}, cache={str(cache_dir(self.cache))!r}"

    # ------------------------------------------------------------------ running
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps of ``images``: float RGB in [0, 1], shape (B, 3, H, W), on the CPU."""
        if self.runtime == "torch":
            return self.torch_extractor(images)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images in [0, 1], got dtype {images.dtype}")
        if images.requires_grad:
            raise ValueError(f"{self.name}: runtime {self.runtime!r} gives no gradients; use runtime 'torch'")
        if images.device.type != "cpu":
            raise ValueError(f"{self.name}: runtime {self.runtime!r} runs on the CPU, got images on {images.device}")
        height, width = int(images.shape[2]), int(images.shape[3])
        session = self.session(height, width)
        x = np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)
        outputs = session.run(x)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(self.layers, outputs, strict=True)}

    def session(self, height: int, width: int) -> _Session:
        """The graph for ``height`` x ``width`` at torch's current thread count: loaded, exported if needed."""
        threads = max(1, torch.get_num_threads())
        memo = (height, width, threads)
        if memo not in self._sessions:
            self._sessions[memo] = self._load(height, width, threads)
        return self._sessions[memo]

    def export_path(self, height: int, width: int) -> Path:
        """Where the graph for ``height`` x ``width`` is cached (its sidecar: the same name, ``.json``)."""
        key = export_key(self.torch_extractor, height, width, self.runtime)
        return cache_dir(self.cache) / f"{_key_name(key)}.onnx"

    def _load(self, height: int, width: int, threads: int) -> _Session:
        key = export_key(self.torch_extractor, height, width, self.runtime)
        path = cache_dir(self.cache) / f"{_key_name(key)}.onnx"
        sidecar = path.with_suffix(".json")
        problem = None
        if path.exists() or sidecar.exists():
            try:
                model = _read_cached(path, sidecar, key)
                session = self._open(model, threads)
                self._check(session, height, width)
                return session
            except Exception as error:  # OSError, ValueError, RuntimeError, or the runtimes' own on a corrupt graph
                problem = f"{type(error).__name__}: {error}"
            warnings.warn(f"cached backbone graph {path} not used ({problem}); exporting it again",
                          RuntimeWarning, stacklevel=3)
        model = _export_onnx(self.torch_extractor, height, width)
        self.exports += 1
        session = self._open(model, threads)
        self._check(session, height, width)  # a fresh graph that differs from torch is an error, never cached
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, model)
        meta = {"key": key, "sha256": hashlib.sha256(model).hexdigest(), "bytes": len(model)}
        _atomic_write(sidecar, json.dumps(meta, indent=2).encode())
        return session

    def _open(self, model: bytes, threads: int) -> _Session:
        base, _, precision = self.runtime.partition("-")
        if base == "onnx":
            return _onnx_session(model, threads)
        return _openvino_session(model, threads, precision or "f32")

    @torch.no_grad()
    def _check(self, session: _Session, height: int, width: int) -> None:
        """The graph's maps on a seeded probe image must match torch's (RuntimeError otherwise)."""
        probe = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        reference = self.torch_extractor(probe)
        outputs = session.run(probe.numpy())
        for layer, found in zip(self.layers, outputs, strict=True):
            expected = reference[layer].numpy()
            if found.shape != expected.shape:
                raise RuntimeError(f"{layer}: graph gives shape {found.shape}, torch {expected.shape}")
            if not np.isfinite(found).all():
                raise RuntimeError(f"{layer}: graph gives NaN or infinite values")
            check_agreement(expected, found, self.runtime, layer)


def map_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, cosine similarity) of two maps, flattened, in float64."""
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(other, dtype=np.float64).ravel()
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
    return diff, cos


def check_agreement(reference: np.ndarray, found: np.ndarray, runtime: str, what: str) -> tuple[float, float]:
    """(max |difference|, cosine) of ``found`` to torch's ``reference`` maps, or RuntimeError naming ``what`` when
    they differ beyond ``runtime``'s gate: f32, a max |difference| of :data:`F32_MAX_RELATIVE_DIFF` times the
    largest |reference| value; bf16, a cosine of :data:`BF16_MIN_COSINE`."""
    diff, cos = map_agreement(reference, found)
    scale = max(float(np.abs(reference).max()), 1e-6) if reference.size else 1e-6
    if runtime.endswith("bf16"):
        if cos < BF16_MIN_COSINE:
            raise RuntimeError(f"{what}: bf16 cosine {cos:.5f} to torch is below {BF16_MIN_COSINE}")
    elif diff > F32_MAX_RELATIVE_DIFF * scale:
        raise RuntimeError(f"{what}: max |difference| to torch {diff:.3g} exceeds "
                           f"{F32_MAX_RELATIVE_DIFF} x {scale:.3g}")
    return diff, cos


def _read_cached(path: Path, sidecar: Path, key: Mapping[str, Any]) -> bytes:
    """The cached graph's bytes if its sidecar names this key and its SHA-256 (ValueError otherwise)."""
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError as error:
        raise ValueError("no sidecar (an interrupted export?)") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt sidecar {sidecar.name}") from error
    if not isinstance(meta, dict) or meta.get("key") != dict(key):
        raise ValueError(f"sidecar {sidecar.name} describes another export")
    model = path.read_bytes()
    if hashlib.sha256(model).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{path.name} does not hash to the SHA-256 its sidecar records (corrupt or replaced)")
    return model


def with_runtime(extractor: FeatureExtractor, runtime: str = DEFAULT_RUNTIME,
                 cache: str | Path | None = None) -> FeatureExtractor | BackboneRuntime:
    """``extractor`` itself for ``"torch"``, else a :class:`BackboneRuntime` running it with ``runtime``."""
    if check_runtime(runtime) == "torch":
        return extractor
    return BackboneRuntime(extractor, runtime, cache=cache)
