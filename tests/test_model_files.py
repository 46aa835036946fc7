"""Model files are untrusted input: every bad setting, bank or path is a clear error naming the file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedinspect.cli import main
from fedinspect.detectors.model_files import MIN_IMAGE_SIZE
from fedinspect.detectors.patchcore import BANK_FILE, CONFIG_FILE, PatchCore
from fedinspect.errors import ModelFileError, SettingsError

from .conftest import textured_image


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fitted EfficientNet-Lite0 PatchCore, saved once; tests tamper with copies."""
    rng = np.random.default_rng(5)
    model = PatchCore(image_size=32, coreset_ratio=0.5).fit([textured_image(rng, 40, 48) for _ in range(2)])
    return model.save(tmp_path_factory.mktemp("models") / "model")


@pytest.fixture
def model_copy(saved_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_model, tmp_path / "model"))


def _edit_config(model: Path, edit) -> None:
    config = json.loads((model / CONFIG_FILE).read_text())
    edit(config)
    (model / CONFIG_FILE).write_text(json.dumps(config))


def _write_bank(model: Path, bank: np.ndarray) -> None:
    save_file({"memory_bank": bank}, str(model / BANK_FILE))
    _edit_config(model, lambda c: c.update(memory_bank_shape=list(bank.shape)))


@pytest.mark.parametrize("size", [0, 1, -64, MIN_IMAGE_SIZE - 1])
def test_an_image_size_below_the_minimum_is_refused_everywhere(size: int, model_copy: Path, tmp_path: Path,
                                                               capsys) -> None:
    from fedinspect.federation.client import RoundSettings

    with pytest.raises(SettingsError, match=f"at least {MIN_IMAGE_SIZE} px, got {size}"):
        PatchCore(image_size=size)
    with pytest.raises(SettingsError, match=f"got {size}"):
        RoundSettings(image_size=size)
    assert main(["-q", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--image-size", str(size)]) == 2
    assert f"image size must be an integer of at least {MIN_IMAGE_SIZE} px" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    _edit_config(model_copy, lambda c: c["params"].update(image_size=size))
    config_file = re.escape(str(model_copy / CONFIG_FILE))
    with pytest.raises(ModelFileError, match=f"{config_file}: invalid settings.*got {size}"):
        PatchCore.load(model_copy)


def test_a_model_file_names_no_path_and_the_weights_are_checked_by_hash(model_copy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    config = json.loads((model_copy / CONFIG_FILE).read_text())
    assert "weights" not in config["params"]
    packaged = PatchCore.load(model_copy).features.extractor.weights_path
    assert config["weights_sha256"] == hashlib.sha256(packaged.read_bytes()).hexdigest()
    assert PatchCore.load(model_copy, weights=packaged).memory_bank_.shape[0] > 0  # the same file, given explicitly

    # The same tensors in another file: a different file than the model was fitted with.
    state = torch.load(packaged, map_location="cpu", weights_only=True) if packaged.suffix != ".safetensors" else None
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(packaged))
    other = tmp_path / "other.safetensors"
    save_torch({k: v.contiguous() for k, v in state.items()}, str(other))
    config_file = re.escape(str(model_copy / CONFIG_FILE))
    with pytest.raises(ModelFileError, match=f"{config_file}: fitted with backbone weights of SHA-256"):
        PatchCore.load(model_copy, weights=other)

    _edit_config(model_copy, lambda c: c["params"].update(weights="/etc/passwd"))
    with pytest.raises(ModelFileError, match="names a weights file") as error:
        PatchCore.load(model_copy)
    assert "cannot read weights" not in str(error.value)  # refused before anything was opened
    _edit_config(model_copy, lambda c: (c["params"].pop("weights"), c.pop("weights_sha256")))
    with pytest.raises(ModelFileError, match="no weights_sha256"):
        PatchCore.load(model_copy)


@pytest.mark.parametrize("problem, match", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("float64", "is float64, expected float32"),
    ("int32", "is int32, expected float32"), ("no params", "no 'params' object"),
    ("params list", "no 'params' object"), ("garbage", "corrupt memory bank"),
])
def test_a_bad_bank_or_settings_file_is_a_model_file_error_naming_it(problem: str, match: str,
                                                                     model_copy: Path) -> None:
    bank = PatchCore.load(model_copy).memory_bank_.copy()
    if problem in ("nan", "inf"):
        bank[1, 3] = np.nan if problem == "nan" else np.inf
        _write_bank(model_copy, bank)
    elif problem in ("float64", "int32"):
        _write_bank(model_copy, bank.astype(problem))
    elif problem == "garbage":
        (model_copy / BANK_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    else:
        _edit_config(model_copy, lambda c: c.pop("params") if problem == "no params" else c.update(params=[1]))
    named = model_copy / (CONFIG_FILE if "params" in problem else BANK_FILE)
    with pytest.raises(ModelFileError, match=f"{re.escape(str(named))}: .*{match}"):
        PatchCore.load(model_copy)


def test_a_bank_from_another_backbone_fails_at_load(model_copy: Path, monkeypatch) -> None:
    _edit_config(model_copy, lambda c: c["params"].update(backbone="efficientnet_lite2"))
    monkeypatch.setattr(PatchCore, "embed_grids", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(ModelFileError, match=r"152-d embeddings but backbone efficientnet_lite2 .* gives 168-d"):
        PatchCore.load(model_copy)


def test_both_model_files_get_the_umask_mode_and_an_unreadable_bank_says_so(saved_model: Path, model_copy: Path,
                                                                            monkeypatch) -> None:
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: (saved_model / name).stat().st_mode & 0o777 for name in (BANK_FILE, CONFIG_FILE)}
    assert modes == {BANK_FILE: 0o666 & ~umask, CONFIG_FILE: 0o666 & ~umask}

    bank = model_copy / BANK_FILE
    if os.geteuid() == 0:  # root reads any file: make reading fail as it does for another user
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self == bank:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    else:
        bank.chmod(0)
    with pytest.raises(ModelFileError, match=re.escape(f"{bank}: cannot read memory bank (Permission denied)")):
        PatchCore.load(model_copy)


def test_a_zero_dp_epsilon_says_epsilon_must_be_positive(tmp_path: Path, capsys) -> None:
    from fedinspect.privacy.bank_dp import BankPrivacy

    assert main(["-q", "federate", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--dp-epsilon", "0"]) == 2
    err = capsys.readouterr().err
    assert "epsilon must be positive" in err and "exactly one" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="not both"):
        BankPrivacy(epsilon=1.0, noise_multiplier=1.0)
