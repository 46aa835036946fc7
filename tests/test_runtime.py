"""The backbone run by onnxruntime / OpenVINO: same maps as torch, a cache that is never trusted blindly,
and the ``runtime`` parameter of PatchCore and PaDiM."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedinspect.backbones import RUNTIMES, BackboneRuntime, get_backbone, untrained_backbone
from fedinspect.backbones.runtime import cache_dir, export_key, map_agreement
from fedinspect.detectors.padim import Padim
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.errors import ModelFileError
from tests.conftest import REAL_DATA

METAL_PLATE = REAL_DATA / "mpdd" / "metal_plate"
COMPILED = ("onnx", "openvino")


@pytest.fixture(scope="module")
def extractor():
    return get_backbone("efficientnet_lite0").fuse_batchnorm()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime_cache")


def _images(n: int) -> list[np.ndarray]:
    """Real metal plates when the shared data is there, else images of the synthetic generator."""
    folder = METAL_PLATE / "train" / "good"
    if folder.is_dir():
        from fedinspect.data.images import read_image

        return [read_image(path) for path in sorted(folder.glob("*.png"))[:n]]
    from fedinspect.data.synthetic import CATEGORIES, generate_image

    category = sorted(CATEGORIES)[0]
    return [generate_image(category, 0, "train", i, None)[0] for i in range(n)]


def _batch(images: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255 for im in images])
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("runtime", COMPILED)
@pytest.mark.parametrize("shape", [(256, 256), (192, 320)])
def test_maps_equal_torch_on_real_images(extractor, shared_cache, runtime: str, shape: tuple[int, int]) -> None:
    images = _batch(_images(3), *shape)
    with torch.no_grad():
        expected = extractor(images)
    found = BackboneRuntime(extractor, runtime, cache=shared_cache)(images)
    assert list(found) == list(extractor.layers)
    for layer in extractor.layers:
        assert found[layer].shape == expected[layer].shape
        assert found[layer].dtype == torch.float32
        diff, cos = map_agreement(expected[layer].numpy(), found[layer].numpy())
        assert diff < 1e-4 * float(expected[layer].abs().max()), (layer, diff)
        assert cos > 0.99999, (layer, cos)


def test_map_agreement_against_numpy() -> None:
    a = np.array([[1.0, 2.0], [3.0, -4.0]])
    b = np.array([[1.0, 2.5], [3.0, -4.0]])
    diff, cos = map_agreement(a, b)
    assert diff == pytest.approx(0.5)
    assert cos == pytest.approx(float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)))


def test_a_second_runtime_reads_the_cache_without_exporting(extractor, tmp_path: Path) -> None:
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    first = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    a = first(x)
    assert first.exports == 1
    path = first.export_path(64, 96)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    stamp = path.stat().st_mtime_ns
    second = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache hit warns of nothing
        b = second(x)
    assert second.exports == 0
    assert path.stat().st_mtime_ns == stamp
    first(x)
    assert first.exports == 1  # the loaded graph is reused within the object too
    for layer in a:
        assert torch.equal(a[layer], b[layer])
    second(torch.rand(1, 3, 96, 64))
    assert second.exports == 1  # another shape, another graph


def test_a_copy_loads_its_graphs_again(extractor, shared_cache) -> None:
    import copy

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    runtime = BackboneRuntime(extractor, "onnx", cache=shared_cache)
    a = runtime(x)
    clone = copy.deepcopy(runtime)
    assert clone._sessions == {} and runtime._sessions
    b = clone(x)
    for layer in a:
        assert torch.equal(a[layer], b[layer])


def test_corrupt_cache_file_is_exported_again_with_a_warning(extractor, tmp_path: Path) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    BackboneRuntime(extractor, "onnx", cache=tmp_path)(x)
    path = BackboneRuntime(extractor, "onnx", cache=tmp_path).export_path(64, 64)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a truncated file
    again = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    with pytest.warns(RuntimeWarning, match="exporting it again"):
        maps = again(x)
    assert again.exports == 1
    assert path.read_bytes() == good or len(path.read_bytes()) > len(good) // 2
    with torch.no_grad():
        expected = extractor(x)
    for layer in maps:
        assert torch.allclose(maps[layer], expected[layer], atol=1e-3)


def test_sidecar_of_another_key_or_missing_is_not_trusted(extractor, tmp_path: Path) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    BackboneRuntime(extractor, "onnx", cache=tmp_path)(x)
    sidecar = BackboneRuntime(extractor, "onnx", cache=tmp_path).export_path(64, 64).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["weights_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    runtime = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    with pytest.warns(RuntimeWarning, match="another export"):
        runtime(x)
    assert runtime.exports == 1
    sidecar.unlink()
    runtime = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    with pytest.warns(RuntimeWarning, match="no sidecar"):
        runtime(x)
    assert runtime.exports == 1


def test_a_cached_graph_of_other_weights_is_caught_by_the_probe(extractor, tmp_path: Path) -> None:
    """A file replaced together with a consistent sidecar still differs from torch on the probe image."""
    torch.manual_seed(0)
    other = untrained_backbone("efficientnet_lite0", layers=list(extractor.layers))
    other.trainable = False
    other.freeze()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    BackboneRuntime(other, "onnx", cache=tmp_path)(x)
    wrong = BackboneRuntime(other, "onnx", cache=tmp_path).export_path(64, 64)
    right = BackboneRuntime(extractor, "onnx", cache=tmp_path).export_path(64, 64)
    assert wrong != right
    meta = json.loads(wrong.with_suffix(".json").read_text())
    meta["key"] = export_key(extractor, 64, 64, "onnx")
    right.write_bytes(wrong.read_bytes())
    right.with_suffix(".json").write_text(json.dumps(meta))
    runtime = BackboneRuntime(extractor, "onnx", cache=tmp_path)
    with pytest.warns(RuntimeWarning, match=r"\|difference\| to torch"):
        maps = runtime(x)
    assert runtime.exports == 1
    with torch.no_grad():
        expected = extractor(x)
    for layer in maps:
        assert torch.allclose(maps[layer], expected[layer], atol=1e-3)


def test_changed_weights_give_a_new_key(extractor, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedinspect.backbones.weights import load_state_dict_file

    copy = tmp_path / "lite0.safetensors"  # the same tensors in another file: other bytes, other SHA-256
    save_file({k: v.contiguous() for k, v in load_state_dict_file(extractor.weights_path).items()}, str(copy))
    moved = get_backbone("efficientnet_lite0", weights=copy).fuse_batchnorm()
    a, b = export_key(extractor, 64, 64, "onnx"), export_key(moved, 64, 64, "onnx")
    assert a["weights_sha256"] != b["weights_sha256"]
    assert {k for k in a if a[k] != b[k]} == {"weights_sha256"}
    assert (BackboneRuntime(extractor, "onnx", cache=tmp_path).export_path(64, 64)
            != BackboneRuntime(moved, "onnx", cache=tmp_path).export_path(64, 64))
    # every part of the key counts
    assert export_key(extractor, 64, 64, "openvino")["runtime"] == "openvino"
    assert export_key(extractor, 64, 64, "openvino-bf16")["precision"] == "bf16"
    assert export_key(extractor, 64, 96, "onnx") != a


def test_cache_directory_from_parameter_environment_or_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDINSPECT_CACHE", raising=False)
    assert cache_dir() == Path("~/.cache/fedinspect/runtime").expanduser()
    monkeypatch.setenv("FEDINSPECT_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"


def test_bad_input_and_unknown_runtime_are_refused(extractor, shared_cache) -> None:
    with pytest.raises(ValueError, match="choices: torch, onnx, openvino"):
        BackboneRuntime(extractor, "tensorrt")
    with pytest.raises(ValueError, match="FeatureExtractor"):
        BackboneRuntime(torch.nn.Identity(), "onnx")  # type: ignore[arg-type]
    runtime = BackboneRuntime(extractor, "onnx", cache=shared_cache)
    with pytest.raises(ValueError, match="shape"):
        runtime(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="float"):
        runtime(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no gradients"):
        runtime(torch.rand(1, 3, 64, 64, requires_grad=True))
    for detector in (PatchCore, Padim):
        with pytest.raises(ValueError, match="choices"):
            detector(runtime="cuda")
    assert RUNTIMES[:3] == ("torch", "onnx", "openvino")


def _fitted_torch_patchcore() -> tuple[PatchCore, list[np.ndarray]]:
    images = [np.ascontiguousarray(im[::8, ::8]) for im in _images(6)]  # 64 x 64 real plates
    model = PatchCore(image_size=64, coreset_ratio=0.5, runtime="torch").fit(images[:4])
    return model, images[4:]


def test_patchcore_scores_with_onnx_equal_torch(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDINSPECT_CACHE", str(tmp_path))
    model, test = _fitted_torch_patchcore()
    scores, maps = model.predict(test)
    onnx = PatchCore(**{**model.get_params(), "runtime": "onnx"}).set_memory_bank(model.memory_bank_)
    onnx_scores, onnx_maps = onnx.predict(test)
    assert isinstance(onnx.features.extractor, BackboneRuntime)
    np.testing.assert_allclose(onnx_scores, scores, atol=1e-4, rtol=0)
    for a, b in zip(maps, onnx_maps, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_runtime_survives_get_params_save_and_load(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDINSPECT_CACHE", str(tmp_path / "cache"))
    model, test = _fitted_torch_patchcore()
    onnx = PatchCore(**{**model.get_params(), "runtime": "onnx"}).set_memory_bank(model.memory_bank_)
    assert onnx.get_params()["runtime"] == "onnx"
    folder = onnx.save(tmp_path / "model")
    assert json.loads((folder / "patchcore.json").read_text())["params"]["runtime"] == "onnx"
    loaded = PatchCore.load(folder)
    assert loaded.runtime == "onnx"
    assert PatchCore.load(folder, runtime="torch").runtime == "torch"
    # a model written before runtimes existed has no key: it ran torch
    config = json.loads((folder / "patchcore.json").read_text())
    del config["params"]["runtime"]
    (folder / "patchcore.json").write_text(json.dumps(config))
    old = PatchCore.load(folder)
    assert old.runtime == "torch"
    assert not isinstance(old.features.extractor, BackboneRuntime)
    np.testing.assert_allclose(old.predict(test)[0], loaded.predict(test)[0], atol=1e-4)
    config["params"]["runtime"] = "tensorrt"
    (folder / "patchcore.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="choices"):
        PatchCore.load(folder)


def test_padim_keeps_its_runtime(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDINSPECT_CACHE", str(tmp_path / "cache"))
    images = [np.ascontiguousarray(im[::8, ::8]) for im in _images(4)]
    model = Padim(image_size=64, n_features=20, runtime="onnx").fit(images[:3])
    assert model.get_params()["runtime"] == "onnx"
    folder = model.save(tmp_path / "padim")
    loaded = Padim.load(folder)
    assert loaded.runtime == "onnx"
    reference = Padim.load(folder, runtime="torch")
    np.testing.assert_allclose(loaded.predict(images[3:])[0], reference.predict(images[3:])[0], atol=1e-4)
