"""Output shapes of the classifiers, and the pretrained backbones' loading and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedinspect.classification.models import (
    ClassifierHead,
    PooledBackbone,
    SmallCNN,
    TransferClassifier,
    load_backbone,
)
from fedinspect.classification.torchvision_nets import MobileNetV2Trunk, mobilenet_v2_backbone, resnet50_backbone
from fedinspect.errors import ModelFileError, WeightsNotFoundError


@pytest.mark.parametrize("size", [32, 64, 96])
def test_small_cnn_gives_one_logit_per_class(size: int) -> None:
    model = SmallCNN(6, size)
    assert model(torch.rand(3, 3, size, size)).shape == (3, 6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # DP-SGD ready


def test_small_cnn_refuses_too_small_images() -> None:
    with pytest.raises(ValueError, match="too small"):
        SmallCNN(3, 4)


def test_seed_head_is_dense_128_relu_then_classes() -> None:
    head = ClassifierHead(1280, 6)
    assert head(torch.rand(5, 1280)).shape == (5, 6)
    assert (head.hidden.in_features, head.hidden.out_features, head.out.out_features) == (1280, 128, 6)


def test_transfer_classifier_pools_the_backbone_maps() -> None:
    trunk = torch.nn.Conv2d(3, 7, 3, stride=4)
    backbone = PooledBackbone(trunk, 7, (0.5,) * 3, (0.5,) * 3, "toy")
    assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert TransferClassifier(backbone, 4)(torch.rand(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("model", ["mobile", "large"])
def test_efficientnet_lite_backbones_give_1280_pooled_features(model: str) -> None:
    backbone = load_backbone(model).freeze()
    features = backbone(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert not any(p.requires_grad for p in backbone.parameters())


def test_seed_backbones_without_local_weights_say_where_they_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDINSPECT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match=r"resnet50-0676ba61\.pth") as error:
        resnet50_backbone()
    assert str(tmp_path) in str(error.value)
    with pytest.raises(WeightsNotFoundError, match="mobilenet_v2"):
        load_backbone("mobilenet_v2")


def test_mobilenet_v2_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    state = MobileNetV2Trunk().state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as old torchvision files
    state["classifier.1.weight"] = torch.zeros(1000, 1280)  # the ImageNet classifier is ignored
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, path)
    backbone = mobilenet_v2_backbone(path)
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 1280)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ModelFileError, match="not a torchvision mobilenet_v2"):
        mobilenet_v2_backbone(tmp_path / "wrong.pth")


@pytest.mark.slow
def test_fine_tuning_under_dp_replaces_batchnorm_and_trains() -> None:
    from fedinspect.classification.runner import ClassifyConfig, InputCache, build_model
    from fedinspect.classification.training import TrainSettings, train_local

    config = ClassifyConfig(model="mobile", fine_tune=True, image_size=32,
                            train=TrainSettings(noise_multiplier=1.0, local_epochs=1, batch_size=4,
                                                accumulation_steps=2))
    model = build_model(config, 3, InputCache())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # GroupNorm instead
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), config.train,
                         seed=0)
    assert result.epsilon is not None and result.steps == 1
    assert not torch.equal(result.state["backbone.trunk.net._conv_stem.weight"],
                           before["backbone.trunk.net._conv_stem.weight"])
