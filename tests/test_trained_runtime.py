"""The frozen teacher of STFPM, reverse distillation and CFLOW run by onnxruntime / OpenVINO: the same maps as
torch's, the same scores, the runtime kept by a saved model, and clear errors for a bad runtime or a runtime
that disagrees with torch."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedinspect.backbones import RUNTIMES, BackboneRuntime
from fedinspect.backbones.runtime import map_agreement
from fedinspect.detectors.cflow import Cflow
from fedinspect.detectors.registry import DETECTORS, WITH_RUNTIME, load_detector
from fedinspect.detectors.reverse_distillation import ReverseDistillation
from fedinspect.detectors.stfpm import Stfpm
from fedinspect.errors import SettingsError

from .conftest import REAL_DATA, textured_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METAL_PLATE = REAL_DATA / "mpdd" / "metal_plate"
CFLOW_SMALL = dict(coupling_blocks=2, condition_vector=16, fiber_batch=256, learning_rate=2e-3)
TINY = {  # a few seconds each on a loaded 2-core machine
    "stfpm": (Stfpm, dict(image_size=64, epochs=3, batch_size=4, learning_rate=0.01, sigma=1.0)),
    "reverse_distillation": (ReverseDistillation, dict(image_size=64, epochs=3, batch_size=4, sigma=1.0)),
    "cflow": (Cflow, dict(image_size=64, epochs=3, batch_size=4, sigma=1.0, **CFLOW_SMALL)),
}


def _real_or_generated(n: int) -> list[np.ndarray]:
    """Real metal plates when the shared data is there, else smooth generated textures."""
    folder = METAL_PLATE / "train" / "good"
    if folder.is_dir():
        from fedinspect.data.images import read_image

        return [read_image(path) for path in sorted(folder.glob("*.png"))[:n]]
    rng = np.random.default_rng(3)
    return [textured_image(rng, 96, 128) for _ in range(n)]


def _tiny_set(seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """8 good training images; 4 good and 4 defective test images (a red square), with labels."""
    rng = np.random.default_rng(seed)
    train = [textured_image(rng, 64, 64) for _ in range(8)]
    good = [textured_image(rng, 64, 64) for _ in range(4)]
    bad = []
    for i in range(4):
        image = textured_image(rng, 64, 64)
        top, left = 8 + 8 * i, 40 - 8 * i
        image[top:top + 14, left:left + 14] = (250, 30, 30)
        bad.append(image)
    return train, good + bad, np.array([0] * 4 + [1] * 4)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_teacher_maps_equal_torch_on_real_or_generated_images(runtime: str) -> None:
    model = Stfpm(image_size=128, runtime=runtime)
    module = model._new_module()
    images = _real_or_generated(3)
    x = torch.stack([model.letterbox(image) for image in images])
    with torch.no_grad():
        expected = module.teacher(x)  # torch eager, the reference
    model._teacher_maps(module, x)  # the first batch of a shape is also compared inside
    found = model._teacher_maps(module, x)  # the runtime alone
    assert model._teacher_runtime is not None and model._teacher_runtime[1].runtime == runtime
    for layer in module.teacher.layers:
        assert found[layer].shape == expected[layer].shape and found[layer].dtype == torch.float32
        diff, cos = map_agreement(expected[layer].numpy(), found[layer].numpy())
        assert diff < 1e-4 * float(expected[layer].abs().max()), (layer, diff)
        assert cos > 0.99999, (layer, cos)
    worst = model.check_teacher_runtime(images)
    assert set(worst) == set(module.teacher.layers)
    for layer, (diff, cos) in worst.items():
        assert diff == pytest.approx(map_agreement(expected[layer].numpy(), found[layer].numpy())[0], abs=1e-6)
        assert cos > 0.99999
    assert model.module_ is None  # checking does not make the detector look fitted


def test_torch_runtime_and_gradients_use_torch_eager() -> None:
    model = Stfpm(image_size=64, runtime="openvino")
    module = model._new_module()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.teacher(x)
    found = model._teacher_maps(module, x.clone().requires_grad_())  # a gradient asked for: torch, exactly
    assert all(torch.equal(found[k], expected[k]) for k in expected)
    assert model._teacher_runtime is None
    eager = Stfpm(image_size=64, runtime="torch")
    assert all(torch.equal(eager._teacher_maps(module, x)[k], expected[k]) for k in expected)
    assert eager._teacher_runtime is None
    with pytest.raises(SettingsError, match="nothing to compare"):
        eager.check_teacher_runtime([np.zeros((64, 64, 3), np.uint8)])


@pytest.mark.parametrize("name", list(TINY))
def test_fit_and_predict_with_torch_and_openvino_agree(name: str) -> None:
    cls, params = TINY[name]
    train, test, labels = _tiny_set(0)
    fitted = {runtime: cls(**params, runtime=runtime, seed=0).fit(train) for runtime in ("torch", "openvino")}
    assert fitted["torch"]._teacher_runtime is None
    assert fitted["openvino"]._teacher_runtime[1]._sessions  # the runtime ran the teacher during training
    aurocs = {runtime: roc_auc_score(labels, model.predict(test)[0]) for runtime, model in fitted.items()}
    assert aurocs["openvino"] == pytest.approx(aurocs["torch"], abs=1e-3)
    assert aurocs["torch"] >= 0.75  # the detectors do find the squares: the equality above is not of two guesses
    # One trained network scored both ways: the maps agree to float rounding. (Two trainings do not give the
    # same weights: Adam's first steps turn float-rounding differences of near-zero gradients into +-lr steps.)
    model = fitted["openvino"]
    scores, maps = model.predict(test)
    model.runtime = "torch"
    torch_scores, torch_maps = model.predict(test)
    scale = max(float(np.abs(m).max()) for m in torch_maps)
    assert max(float(np.abs(a - b).max()) for a, b in zip(maps, torch_maps, strict=True)) < 1e-4 * scale
    np.testing.assert_allclose(scores, torch_scores, rtol=1e-4)


def test_save_and_load_keep_the_runtime(tmp_path: Path) -> None:
    train, test, _ = _tiny_set(1)
    model = Stfpm(**TINY["stfpm"][1], runtime="openvino", seed=0).fit(train[:4])
    model.save(tmp_path)
    assert json.loads((tmp_path / "stfpm.json").read_text())["params"]["runtime"] == "openvino"
    loaded = load_detector(tmp_path)
    assert isinstance(loaded, Stfpm) and loaded.runtime == "openvino" and loaded.get_params() == model.get_params()
    np.testing.assert_allclose(loaded.predict(test[:2])[0], model.predict(test[:2])[0], rtol=1e-6)
    assert Stfpm.load(tmp_path, runtime="torch").runtime == "torch"
    assert load_detector(tmp_path, runtime="onnx").runtime == "onnx"
    config = json.loads((tmp_path / "stfpm.json").read_text())
    del config["params"]["runtime"]  # a model saved before the teacher had a runtime
    (tmp_path / "stfpm.json").write_text(json.dumps(config))
    assert Stfpm.load(tmp_path).runtime == "torch"


def test_bad_runtime_names_are_clear_errors(tmp_path: Path) -> None:
    for cls in (Stfpm, ReverseDistillation, Cflow):
        with pytest.raises(SettingsError, match="unknown runtime 'tensorrt'; choices: torch, onnx, openvino"):
            cls(runtime="tensorrt")
    Stfpm(**{**TINY["stfpm"][1], "epochs": 1}).fit(_tiny_set(2)[0][:3]).save(tmp_path)
    with pytest.raises(SettingsError, match="unknown runtime 'cuda'"):
        Stfpm.load(tmp_path, runtime="cuda")
    from fedinspect.detectors.autoencoder import AutoencoderMSE

    with pytest.raises(SettingsError, match="no frozen backbone"):
        AutoencoderMSE.load(tmp_path, runtime="onnx")


def test_with_runtime_lists_the_detectors_whose_constructor_takes_one() -> None:
    takers = [name for name in DETECTORS if "runtime" in inspect.signature(DETECTORS[name].__init__).parameters]
    assert sorted(WITH_RUNTIME) == sorted(takers)
    for name in ("stfpm", "reverse_distillation", "cflow"):
        default = inspect.signature(DETECTORS[name].__init__).parameters["runtime"].default
        assert default == "openvino" and default in RUNTIMES


def test_a_runtime_that_disagrees_with_torch_stops_training(monkeypatch) -> None:
    forward = BackboneRuntime.forward

    def off_by_a_little(self, images):
        return {k: v + 1e-2 * v.abs().max() for k, v in forward(self, images).items()}

    monkeypatch.setattr(BackboneRuntime, "forward", off_by_a_little)
    with pytest.raises(RuntimeError, match=r"stfpm: teacher efficientnet_lite0 layer stride4 run by runtime "
                                           r"'openvino'.*max \|difference\| to torch"):
        Stfpm(**TINY["stfpm"][1], runtime="openvino").fit(_tiny_set(3)[0][:4])
