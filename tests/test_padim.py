from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fedinspect.cli import main
from fedinspect.detectors.padim import CONFIG_FILE, GAUSSIANS_FILE, MODEL_FORMAT, Padim
from fedinspect.detectors.registry import DESCRIPTIONS, DETECTORS, get_detector, load_detector
from fedinspect.errors import FedinspectError, ModelFileError, SettingsError

from .conftest import textured_image


@pytest.fixture(scope="module")
def train_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [textured_image(rng, 64, 96) for _ in range(6)]


@pytest.fixture(scope="module")
def fitted(train_images: list[np.ndarray]) -> Padim:
    return Padim(image_size=64, n_features=20, seed=0, batch_size=4).fit(train_images)


@pytest.fixture(scope="module")
def saved(fitted: Padim, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("padim") / "model")


def _selected_features(model: Padim, images: list[np.ndarray]) -> np.ndarray:
    """(n_images, positions, k) float64 features of the selected channels, computed independently of fit."""
    features = model.features(torch.stack([model.letterbox(image) for image in images])).double().numpy()
    chosen = features[:, model.channels]  # (n, k, h, w)
    return chosen.reshape(len(images), len(model.channels), -1).transpose(0, 2, 1)


def test_mean_and_covariance_equal_numpy_on_the_same_features(fitted: Padim, train_images) -> None:
    x = _selected_features(fitted, train_images)
    assert fitted.grid_shape_ == (8, 12) and fitted.mean_.shape == (96, 20)
    np.testing.assert_allclose(fitted.mean_, x.mean(axis=0), rtol=1e-6, atol=1e-8)
    for position in (0, 37, 95):
        expected = np.cov(x[:, position], rowvar=False) + 0.01 * np.eye(20)
        np.testing.assert_allclose(fitted.covariance_[position], expected, rtol=1e-5, atol=1e-8)


def test_channels_are_a_seeded_subset() -> None:
    a, b = Padim(image_size=64, n_features=20, seed=0), Padim(image_size=64, n_features=20, seed=1)
    assert len(set(a.channels)) == 20 and a.channels.max() < a.features.dim
    assert np.array_equal(a.channels, Padim(image_size=64, n_features=20, seed=0).channels)
    assert not np.array_equal(a.channels, b.channels)
    with pytest.raises(SettingsError, match="between 1 and the backbone's 152 channels, got 500"):
        _ = Padim(image_size=64, n_features=500).channels


def test_maps_are_mahalanobis_distances_and_the_score_is_their_maximum(fitted: Padim) -> None:
    image = textured_image(np.random.default_rng(7), 64, 96)
    x = _selected_features(fitted, [image])[0]
    delta = x - fitted.mean_
    expected = np.sqrt(np.einsum("pi,pij,pj->p", delta, np.linalg.inv(fitted.covariance_), delta))
    features = fitted.features(fitted.letterbox(image)[None])
    distances = fitted._scorer(features)[0].numpy()
    assert distances.shape == (8, 12)
    np.testing.assert_allclose(distances.reshape(-1), expected, rtol=1e-3)
    scores, maps = fitted.predict([image])
    assert scores[0] == maps[0].max()
    # smoothing and bilinear upsampling only average the patch distances
    assert distances.min() - 1e-3 <= maps[0].min() and maps[0].max() <= distances.max() + 1e-3


def test_sufficient_statistics_of_two_halves_add_up_to_the_whole(fitted: Padim, train_images) -> None:
    halves = [Padim(image_size=64, n_features=20, seed=0).fit(part) for part in (train_images[:2], train_images[2:])]
    whole = fitted.sufficient_statistics_
    assert sum(h.sufficient_statistics_["count"] for h in halves) == whole["count"] == 6
    for key in ("sum", "sum_outer"):
        np.testing.assert_allclose(sum(h.sufficient_statistics_[key] for h in halves), whole[key], rtol=1e-9)
    merged = Padim(image_size=64, n_features=20, seed=0).set_statistics(
        whole["count"], sum(h.sufficient_statistics_["sum"] for h in halves),
        sum(h.sufficient_statistics_["sum_outer"] for h in halves), (8, 12))
    np.testing.assert_allclose(merged.covariance_, fitted.covariance_, rtol=1e-7, atol=1e-10)


def test_a_planted_bright_defect_scores_above_good_images(fitted: Padim) -> None:
    rng = np.random.default_rng(5)
    good = [textured_image(rng, 64, 96) for _ in range(3)]
    bad = textured_image(rng, 64, 96)
    bad[20:36, 30:46] = 250
    scores, maps = fitted.predict([*good, bad])
    assert scores[3] > scores[:3].max()
    assert [m.shape for m in maps] == [(64, 96)] * 4
    peak = np.unravel_index(np.argmax(maps[3]), maps[3].shape)
    assert 12 <= peak[0] <= 44 and 22 <= peak[1] <= 54


def test_other_aspect_ratios_are_refused_clearly(fitted: Padim, train_images) -> None:
    with pytest.raises(FedinspectError, match=r"8x12 feature grid, but an image of 250x50 px gives a 8x40 grid"):
        fitted.predict([textured_image(np.random.default_rng(1), 50, 250)])
    with pytest.raises(FedinspectError, match="same aspect ratio"):
        Padim(image_size=64, n_features=20).fit([*train_images[:2], textured_image(np.random.default_rng(1), 64, 64)])
    with pytest.raises(FedinspectError, match="at least 2 training images for a covariance, got 1"):
        Padim(image_size=64, n_features=20).fit(train_images[:1])


def test_stretched_images_of_mixed_shapes_share_one_grid(train_images, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    mixed = [*train_images[:3], textured_image(rng, 64, 64), textured_image(rng, 120, 50)]
    model = Padim(image_size=64, n_features=20, keep_aspect_ratio=False).fit(mixed)
    assert model.grid_shape_ == (8, 8) and model.grid_shape((13, 200)) == (8, 8)  # stride 8 at 64 px
    tall = textured_image(rng, 90, 30)
    scores, maps = model.predict([tall, train_images[0]])
    assert maps[0].shape == (90, 30) and maps[1].shape == (64, 96)
    loaded = load_detector(model.save(tmp_path / "stretched"))
    assert loaded.keep_aspect_ratio is False
    assert np.allclose(loaded.score_samples([tall, train_images[0]]), scores)
    with pytest.raises(SettingsError, match="keep_aspect_ratio must be true or false"):
        Padim(keep_aspect_ratio="no")


def test_save_load_gives_identical_scores_through_the_registry(fitted: Padim, saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["format"] == MODEL_FORMAT and "weights" not in config["params"]
    loaded = load_detector(saved)
    assert isinstance(loaded, Padim) and loaded.get_params() == fitted.get_params()
    images = [textured_image(np.random.default_rng(3), 64, 96) for _ in range(2)]
    expected_scores, expected_maps = fitted.predict(images)
    scores, maps = loaded.predict(images)
    assert np.array_equal(scores, expected_scores)
    assert all(np.array_equal(a, b) for a, b in zip(maps, expected_maps, strict=True))


def _corrupt(model: Path, problem: str) -> Path:
    config_path, tensors_path = model / CONFIG_FILE, model / GAUSSIANS_FILE
    config = json.loads(config_path.read_text())
    tensors = load_file(tensors_path)
    if problem == "garbage":
        tensors_path.write_bytes(b"not a safetensors file")
    elif problem == "nan":
        tensors["mean"][0, 0] = np.nan
        save_file(tensors, tensors_path)
    elif problem == "float64":
        tensors["inv_cov"] = tensors["inv_cov"].astype(np.float64)
        save_file(tensors, tensors_path)
    elif problem == "shape":
        config["grid_shape"] = [8, 13]
        config_path.write_text(json.dumps(config))
    elif problem == "grid":
        config["grid_shape"] = "../../etc"
        config_path.write_text(json.dumps(config))
    elif problem == "json":
        config_path.write_text("{")
    elif problem == "hash":
        config["weights_sha256"] = "0" * 64
        config_path.write_text(json.dumps(config))
    elif problem == "weights":
        config["params"]["weights"] = "/etc/passwd"
        config_path.write_text(json.dumps(config))
    return tensors_path if problem in ("garbage", "nan", "float64", "shape") else config_path


@pytest.mark.parametrize(("problem", "match"), [
    ("garbage", "corrupt Gaussians file"), ("nan", "'mean' contains NaN"), ("float64", "'inv_cov' is float64"),
    ("shape", r"'mean' has shape \[96, 20\], expected \[104, 20\]"), ("grid", "grid_shape must be two positive"),
    ("json", "corrupt settings file"), ("hash", "fitted with backbone weights of SHA-256"),
    ("weights", "names a weights file"),
])
def test_corrupt_model_files_are_model_file_errors_naming_the_file(saved: Path, tmp_path: Path, problem: str,
                                                                   match: str) -> None:
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    named = _corrupt(model, problem)
    with pytest.raises(ModelFileError, match=f"{re.escape(str(named))}: .*{match}"):
        load_detector(model)


def test_load_detector_refuses_unknown_formats_and_empty_folders(saved: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(saved, tmp_path / "model"))
    config = json.loads((model / CONFIG_FILE).read_text())
    config["format"] = "fedinspect.padim/99"
    (model / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=re.escape(f"{model / CONFIG_FILE}: unknown model format")):
        load_detector(model)
    with pytest.raises(ModelFileError, match="no detector settings file"):
        load_detector(tmp_path)


def test_registry_names_every_detector_and_matches_their_modules() -> None:
    from fedinspect.detectors import padim, patchcore
    from fedinspect.detectors.registry import _ENTRIES, TRAINED

    assert set(DETECTORS) == set(DESCRIPTIONS) == {"patchcore", "padim", *TRAINED}
    assert DETECTORS["padim"] is Padim and DETECTORS["patchcore"] is patchcore.PatchCore
    assert _ENTRIES["padim"][2:4] == (padim.CONFIG_FILE, padim.MODEL_FORMAT)
    assert _ENTRIES["patchcore"][2:4] == (patchcore.CONFIG_FILE, patchcore.MODEL_FORMAT)
    for name in TRAINED:  # the settings file and format the registry reads are the ones the class writes
        cls = DETECTORS[name]
        assert cls.name == name and _ENTRIES[name][2:4] == (cls.config_file(), cls.model_format)
    assert isinstance(get_detector("padim", image_size=64), Padim)
    with pytest.raises(SettingsError, match="unknown detector 'spade'"):
        get_detector("spade")


def test_cli_fit_padim_then_evaluate(mvtec_category: Path, tmp_path: Path, capsys) -> None:
    model, out = tmp_path / "model", tmp_path / "eval"
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(model), "--detector", "padim",
                 "--image-size", "64", "--n-features", "30"]) == 0
    assert "PaDiM" in capsys.readouterr().out
    assert (model / CONFIG_FILE).is_file()
    assert main(["-q", "evaluate", "--model", str(model), "--data", str(mvtec_category), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["detector"] == "padim" and results["model"]["n_features"] == 30
    assert results["counts"]["train"] == 3 and set(results["image_scores"]) == {
        "test/good/000.png", "test/crack/000.png", "test/crack/001.png"}


def test_cli_refuses_options_of_the_other_detector(mvtec_category: Path, tmp_path: Path, capsys) -> None:
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(tmp_path / "m"), "--detector", "padim",
                 "--coreset-ratio", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--coreset-ratio does not apply to --detector padim (detectors that take it: patchcore)" in err
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(tmp_path / "m"),
                 "--n-features", "30"]) == 2
    err = capsys.readouterr().err
    assert "--n-features does not apply to --detector patchcore (detectors that take it: padim)" in err
    assert not (tmp_path / "m").exists()


def test_cli_lists_the_detectors(capsys) -> None:
    assert main(["detectors"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^patchcore\s+memory bank", out, re.M) and re.search(r"^padim\s+one Gaussian", out, re.M)


def test_patchcore_stays_the_default_and_is_named_in_the_results(mvtec_category: Path, tmp_path: Path) -> None:
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.pipeline import evaluate_category, fit_category

    model = fit_category(mvtec_category, tmp_path / "model", progress=False, image_size=64)
    assert isinstance(model, PatchCore) and isinstance(load_detector(tmp_path / "model"), PatchCore)
    results = evaluate_category(tmp_path / "model", mvtec_category, progress=False, write_maps=False)
    assert results["detector"] == "patchcore" and results["counts"]["memory_bank"] == model.memory_bank_.shape[0]


def test_a_category_of_mixed_aspect_ratios_names_the_image_padim_refuses(mvtec_category: Path, tmp_path: Path,
                                                                        capsys) -> None:
    from .conftest import save_png

    wide = save_png(mvtec_category / "train" / "good" / "100.png", textured_image(np.random.default_rng(4), 48, 150))
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(tmp_path / "m"), "--detector", "padim",
                 "--image-size", "64", "--n-features", "30"]) == 2
    error = capsys.readouterr().err
    assert f"fedinspect: error: {wide}: PaDiM models one Gaussian per position of a 8x12 feature grid" in error
    assert not (tmp_path / "m").exists()


def test_refitting_into_a_padim_model_folder_replaces_it(mvtec_category: Path, tmp_path: Path) -> None:
    for _ in range(2):  # the second fit recognises the folder as a fedinspect model, not as someone's files
        assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(tmp_path / "m"), "--detector", "padim",
                     "--image-size", "64", "--n-features", "30"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["gaussians.safetensors", "padim.json"]
