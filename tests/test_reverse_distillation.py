"""Reverse distillation: frozen teacher encoder, one-class bottleneck, student decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedinspect.detectors.registry import load_detector
from fedinspect.detectors.reverse_distillation import ReverseDistillation
from fedinspect.detectors.trained_detector import WEIGHTS_FILE
from fedinspect.errors import ModelFileError, SettingsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int, shape=(64, 64)) -> list[np.ndarray]:
    """Grey images with a fine random texture: all alike, as a category's good images are."""
    rng = np.random.default_rng(seed)
    return [np.clip(128 + rng.normal(0, 10, (*shape, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _with_defect(image: np.ndarray) -> np.ndarray:
    defect = image.copy()
    defect[20:36, 24:40] = (250, 30, 30)
    return defect


def test_bottleneck_and_decoder_mirror_the_teacher_scales():
    module = ReverseDistillation(image_size=64)._build_module()
    images = torch.rand(2, 3, 64, 96)
    teacher = module.teacher(images)
    embedding = module.bottleneck([teacher[k] for k in module.teacher.layers])
    assert embedding.shape == (2, 224, 2, 3)  # stride 32, twice the coarsest map's 112 channels
    x, shapes = embedding, []
    for stage in module.decoder:
        x, out = stage(x)
        shapes.append(tuple(out.shape))
    assert shapes[::-1] == [tuple(teacher[k].shape) for k in ("stride4", "stride8", "stride16")]
    assert not any(p.requires_grad for p in module.teacher.parameters())
    trainable = {name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"bottleneck", "decoder"}


def test_distance_is_one_minus_cosine_per_position_and_the_paper_optimizer_is_used():
    model = ReverseDistillation(image_size=64)
    module = model._build_module().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        teacher = module.teacher(images)
        x, rebuilt = module.bottleneck([teacher[k] for k in module.teacher.layers]), []
        for stage in module.decoder:
            x, out = stage(x)
            rebuilt.append(out)
        for k, s, d in zip(module.teacher.layers, reversed(rebuilt), module.distances(images), strict=True):
            t, s = teacher[k].numpy(), s.numpy()
            cos = (t * s).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)
            np.testing.assert_allclose(d.numpy(), 1 - cos, atol=1e-5)
        loss = model._training_loss(module, images, torch.Generator())
        assert float(loss) == pytest.approx(sum(float(d.mean()) for d in module.distances(images)), rel=1e-6)
    optimizer = model._optimizer(module)
    assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["lr"] == 0.005


def test_fit_finds_a_planted_defect_and_save_load_gives_the_same_scores(tmp_path):
    train, test = _images(8, 0), _images(3, 1)
    model = ReverseDistillation(image_size=64, epochs=8, patience=0, batch_size=4, sigma=1.0).fit(train)
    assert model.history_[-1]["train_loss"] < model.history_[0]["train_loss"]
    scores, maps = model.predict([*test, _with_defect(test[0])])
    assert scores[3] > scores[:3].max()
    assert maps[3][20:36, 24:40].mean() > maps[3][:16, :16].mean()
    model.save(tmp_path)
    config = json.loads((tmp_path / "reverse_distillation.json").read_text())
    assert config["format"] == "fedinspect.reverse_distillation/1" and config["weights_sha256"]
    loaded = load_detector(tmp_path)
    assert isinstance(loaded, ReverseDistillation) and loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict([*test, _with_defect(test[0])])[0], scores)


def test_same_seed_same_weights():
    first = ReverseDistillation(image_size=32, epochs=2, seed=4).fit(_images(6, 0, (32, 32)))
    second = ReverseDistillation(image_size=32, epochs=2, seed=4).fit(_images(6, 0, (32, 32)))
    for a, b in zip(first.module_.state_dict().values(), second.module_.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_corrupt_or_mismatched_weights_file_is_refused(tmp_path):
    ReverseDistillation(image_size=32, epochs=1).fit(_images(4, 0, (32, 32))).save(tmp_path)
    config_path = tmp_path / "reverse_distillation.json"
    config = json.loads(config_path.read_text())
    config["params"]["layers"] = ["stride8", "stride16"]  # another bottleneck than the file's
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="weights"):
        ReverseDistillation.load(tmp_path)
    config["params"]["layers"] = None
    config_path.write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError):
        ReverseDistillation.load(tmp_path)


@pytest.mark.parametrize(("params", "match"), [
    ({"backbone": "wide_resnet18"}, "backbone"),
    ({"layers": ["stride4", "nope"]}, "nope"),
    ({"layers": "stride8"}, "layers"),
    ({"batch_size": 0}, "batch_size"),
    ({"sigma": -1}, "sigma"),
])
def test_bad_parameters_are_settings_errors(params, match):
    with pytest.raises(SettingsError, match=match):
        ReverseDistillation(**params)


def test_layers_too_coarse_for_the_bottleneck_are_refused():
    with pytest.raises(SettingsError, match="strides"):
        ReverseDistillation(layers=["stride8", "stride32"])._build_module()
