from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedinspect.detectors.patchcore import BANK_FILE, CONFIG_FILE, PatchCore
from fedinspect.errors import ModelFileError

from .conftest import textured_image


@pytest.fixture(scope="module")
def train_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [textured_image(rng, 64, 96) for _ in range(6)]


@pytest.fixture(scope="module")
def fitted(train_images: list[np.ndarray]) -> PatchCore:
    return PatchCore(image_size=64, coreset_ratio=0.25, seed=0).fit(train_images)


def test_fit_builds_a_coreset_of_the_requested_ratio(fitted: PatchCore) -> None:
    # 64x96 -> 8x12 stride-8 cells per image, 6 images
    assert fitted.n_train_patches_ == 6 * 8 * 12
    assert fitted.memory_bank_.shape == (round(0.25 * 576), 152)
    assert fitted.memory_bank_.dtype == np.float32


def test_patch_scores_are_nearest_neighbour_distances(fitted: PatchCore) -> None:
    """With reweighting off, the image score is the largest brute-force nearest-bank distance."""
    image = textured_image(np.random.default_rng(9), 64, 96)
    plain = PatchCore(image_size=64, num_neighbors=1).set_memory_bank(fitted.memory_bank_)
    patches = plain.embed([image])
    distances = np.linalg.norm(patches[:, None, :] - fitted.memory_bank_[None], axis=2).min(axis=1)
    assert plain.score_samples([image])[0] == pytest.approx(distances.max(), rel=1e-4)


def test_reweighted_score_follows_patchcore_equation(fitted: PatchCore) -> None:
    image = textured_image(np.random.default_rng(10), 64, 96)
    bank = fitted.memory_bank_
    patches = fitted.embed([image])
    all_distances = np.linalg.norm(patches[:, None, :] - bank[None], axis=2)
    worst = int(all_distances.min(axis=1).argmax())
    nearest = int(all_distances[worst].argmin())
    support = np.argsort(np.linalg.norm(bank - bank[nearest], axis=1), kind="stable")[:9]
    d = np.linalg.norm(bank[support] - patches[worst], axis=1)
    expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * all_distances[worst].min()
    assert fitted.score_samples([image])[0] == pytest.approx(expected, rel=1e-4)


def test_image_scores_under_an_approximate_index_equal_exact_search(train_images: list[np.ndarray]) -> None:
    """IVF probing 1 of its cells misses most nearest patches; each image's maximum is made exact anyway."""
    bank = PatchCore(image_size=64, coreset_ratio=1.0).fit(train_images).memory_bank_
    exact = PatchCore(image_size=64, search="exact").set_memory_bank(bank)
    approximate = PatchCore(image_size=64, search="ivf").set_memory_bank(bank)
    approximate._check_fitted().nprobe = 1
    rng = np.random.default_rng(4)
    images = [textured_image(rng, 64, 96), textured_image(rng, 50, 250), textured_image(rng, 64, 96)]
    images[2][20:36, 50:66] = [255, 0, 0]
    (exact_scores, exact_maps), (scores, maps) = exact.predict(images), approximate.predict(images)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    assert any(not np.allclose(m, e, rtol=1e-4) for m, e in zip(maps, exact_maps, strict=True))  # patches missed
    assert all((m >= e - 1e-4).all() for m, e in zip(maps, exact_maps, strict=True))  # never closer than exact


def test_maps_come_back_at_original_size_for_any_shape(fitted: PatchCore) -> None:
    rng = np.random.default_rng(1)
    images = [textured_image(rng, 64, 96), textured_image(rng, 50, 250), textured_image(rng, 33, 41)]
    scores, maps = fitted.predict(images)
    assert [m.shape for m in maps] == [(64, 96), (50, 250), (33, 41)]
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_a_visible_defect_scores_higher_and_is_localised(fitted: PatchCore) -> None:
    rng = np.random.default_rng(2)
    good = textured_image(rng, 64, 96)
    bad = textured_image(rng, 64, 96)
    bad[20:36, 50:66] = [255, 0, 0]
    scores, maps = fitted.predict([good, bad])
    assert scores[1] > scores[0]
    y, x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert 12 <= y <= 44 and 42 <= x <= 74


def test_elongated_strip_defect_is_found(train_images: list[np.ndarray]) -> None:
    rng = np.random.default_rng(3)
    strips = [textured_image(rng, 40, 200) for _ in range(4)]
    model = PatchCore(image_size=40, coreset_ratio=0.5).fit(strips)
    bad = textured_image(rng, 40, 200)
    bad[15:23, 150:158] = 255
    _, maps = model.predict([bad])
    _, x = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert maps[0].shape == (40, 200) and 140 <= x <= 168


def test_same_seed_same_bank(train_images: list[np.ndarray]) -> None:
    a = PatchCore(image_size=64, coreset_ratio=0.1, seed=5).fit(train_images).memory_bank_
    b = PatchCore(image_size=64, coreset_ratio=0.1, seed=5).fit(train_images).memory_bank_
    assert np.array_equal(a, b)


def test_save_load_roundtrip(fitted: PatchCore, tmp_path: Path) -> None:
    fitted.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    assert np.array_equal(loaded.memory_bank_, fitted.memory_bank_)
    assert loaded.get_params() == fitted.get_params()
    image = textured_image(np.random.default_rng(4), 64, 96)
    assert loaded.score_samples([image])[0] == fitted.score_samples([image])[0]
    # safe formats only: JSON settings and a safetensors bank
    assert json.loads((tmp_path / "model" / CONFIG_FILE).read_text())["format"].startswith("fedinspect")


def test_corrupt_and_missing_model_files_are_named(fitted: PatchCore, tmp_path: Path) -> None:
    folder = fitted.save(tmp_path / "model")
    (folder / BANK_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match=r"memory_bank\.safetensors: corrupt"):
        PatchCore.load(folder)
    (folder / BANK_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"memory_bank\.safetensors: missing"):
        PatchCore.load(folder)
    fitted.save(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["memory_bank_shape"] = [1, 1]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="does not match"):
        PatchCore.load(folder)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(ModelFileError, match="corrupt settings"):
        PatchCore.load(folder)


def test_unfitted_model_and_bad_bank_raise() -> None:
    with pytest.raises(RuntimeError, match="no memory bank"):
        PatchCore().predict([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="NaN"):
        PatchCore().set_memory_bank(np.full((3, 152), np.nan, np.float32))
    wrong = PatchCore(image_size=32).set_memory_bank(np.zeros((3, 10), np.float32))
    with pytest.raises(ValueError, match="10-d embeddings"):
        wrong.predict([np.zeros((32, 32, 3), np.uint8)])
