"""The synthetic AutoVI-layout dataset: layout, ground truth, determinism, visibility, arguments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fedinspect.data import synthetic
from fedinspect.data.synthetic import CATEGORIES, SIZES, generate_dataset, generate_image
from fedinspect.errors import DataError

TINY = {"train": 4, "test_good": 2, "test_defective": 2}
N_DEFECT_TYPES = {
    "engine_wiring": 4,
    "pipe_clip": 2,
    "pipe_staple": 1,
    "tank_screw": 1,
    "underbody_pipes": 3,
    "underbody_screw": 1,
}
ALL_PAIRS = [(category, defect) for category in CATEGORIES for defect in synthetic.defect_types(category)]


@pytest.fixture(scope="session")
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset (seed 0), shared with the other test modules through conftest when it offers it."""
    try:
        return request.getfixturevalue("tiny_dataset")
    except pytest.FixtureLookupError:
        out = tmp_path_factory.mktemp("synthetic") / "tiny"
        return generate_dataset(out, seed=0, size="tiny", progress=False)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _config(root: Path, category: str) -> list[dict]:
    return json.loads((root / category / "defects_config.json").read_text())


# ---------------------------------------------------------------------------------------------- layout


def test_sizes_and_categories_are_autovi_s() -> None:
    assert SIZES == ("tiny", "small", "full")
    assert CATEGORIES == {
        "engine_wiring": (400, 400),
        "pipe_clip": (400, 400),
        "pipe_staple": (400, 400),
        "tank_screw": (1000, 750),
        "underbody_pipes": (1000, 750),
        "underbody_screw": (1000, 750),
    }
    assert {c: len(synthetic.defect_types(c)) for c in CATEGORIES} == N_DEFECT_TYPES
    kinds = {kind for category in CATEGORIES for kind in synthetic.defect_types(category)}
    assert kinds == set(synthetic.DEFECT_KINDS)


def test_tiny_layout_counts_and_image_sizes(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir() if p.is_dir()) == sorted(CATEGORIES)
    assert not list(tiny.glob(".*")), "temporary files left behind"
    manifest = json.loads((tiny / "dataset.json").read_text())
    assert (manifest["seed"], manifest["size"], manifest["generator"]) == (0, "tiny", synthetic.GENERATOR)
    for category, (width, height) in CATEGORIES.items():
        root = tiny / category
        assert [p.name for p in (root / "train").iterdir()] == ["good"], "train must hold good images only"
        train = sorted((root / "train" / "good").iterdir())
        good = sorted((root / "test" / "good").iterdir())
        defect_dirs = [d for d in (root / "test").iterdir() if d.name != "good"]
        defective = sorted(p for d in defect_dirs for p in d.iterdir())
        assert [p.name for p in train] == [f"{i:04d}.png" for i in range(TINY["train"])]
        assert [p.name for p in good] == [f"{i:04d}.png" for i in range(TINY["test_good"])]
        assert len(defective) == TINY["test_defective"]
        assert {d.name for d in defect_dirs} <= {e["defect_name"] for e in _config(tiny, category)}
        for path in train + good + defective:
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (width, height))
        counts = manifest["categories"][category]
        assert (counts["train"], counts["test_good"], sum(counts["test_defective"].values())) == (4, 2, 2)


# ---------------------------------------------------------------------------------------------- ground truth


def test_ground_truth_masks_and_defect_configs(tiny: Path) -> None:
    saw_relative = saw_absolute = False
    for category, (width, height) in CATEGORIES.items():
        root = tiny / category
        config = _config(tiny, category)
        assert len(config) == N_DEFECT_TYPES[category]
        values = {entry["defect_name"]: entry["pixel_value"] for entry in config}
        assert len(set(values.values())) == len(values), "pixel values must be distinct within a category"
        for entry in config:
            assert isinstance(entry["pixel_value"], int) and 1 <= entry["pixel_value"] <= 255
            threshold = entry["saturation_threshold"]
            if entry["relative_saturation"] is True:
                saw_relative = True
                assert isinstance(threshold, float) and 0 < threshold <= 1
            else:
                assert entry["relative_saturation"] is False
                saw_absolute = True
                assert isinstance(threshold, int) and 100 <= threshold <= 10_000
        assert not (root / "ground_truth" / "good").exists()
        for image_path in sorted((root / "test").glob("*/*.png")):
            defect = image_path.parent.name
            truth = root / "ground_truth" / defect / image_path.stem
            if defect == "good":
                assert not truth.exists()
                continue
            masks = sorted(truth.iterdir())
            assert 1 <= len(masks) <= 2
            assert [m.name for m in masks] == [f"{k:03d}.png" for k in range(len(masks))]
            for mask_path in masks:
                mask = _read(mask_path)
                assert mask.shape == (height, width, 3)
                assert (mask[..., 0] == mask[..., 1]).all() and (mask[..., 0] == mask[..., 2]).all()
                assert set(np.unique(mask).tolist()) == {0, values[defect]}
    assert saw_relative and saw_absolute


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_whatever_the_worker_count(tiny: Path, tmp_path: Path) -> None:
    categories = ["pipe_clip", "pipe_staple"]  # the fixture used a process pool (on >1 core), this run none
    again = generate_dataset(
        tmp_path / "again", size="tiny", categories=categories, progress=False, workers=1
    )
    expected = {k: v for k, v in _hashes(tiny).items() if k.split("/")[0] in categories}
    got = {k: v for k, v in _hashes(again).items() if k != "dataset.json"}
    assert got == expected


def test_different_seed_gives_different_images(tiny: Path, tmp_path: Path) -> None:
    other = generate_dataset(
        tmp_path / "other", seed=1, size="tiny", categories=["pipe_staple"], progress=False
    )
    mine, theirs = _hashes(tiny / "pipe_staple"), _hashes(other / "pipe_staple")
    images = [k for k in mine if k.startswith(("train/", "test/"))]
    assert images and sorted(images) == sorted(k for k in theirs if k.startswith(("train/", "test/")))
    assert all(mine[k] != theirs[k] for k in images)


def test_generate_image_ignores_global_random_state() -> None:
    np.random.seed(1)  # noqa: NPY002 - the point is that the legacy global state plays no part
    first, masks_a = generate_image("engine_wiring", 3, "test", 5, "misplaced")
    np.random.seed(2)  # noqa: NPY002
    second, masks_b = generate_image("engine_wiring", 3, "test", 5, "misplaced")
    assert np.array_equal(first, second)
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b, strict=True))


def test_files_match_generate_image(tiny: Path) -> None:
    """The file test/<defect>/0000.png is test image number n_good of the split."""
    category = "pipe_clip"
    defect = synthetic.defect_types(category)[0]
    image, masks = generate_image(category, 0, "test", TINY["test_good"], defect)
    assert np.array_equal(_read(tiny / category / "test" / defect / "0000.png"), image)
    truth = sorted((tiny / category / "ground_truth" / defect / "0000").iterdir())
    assert len(truth) == len(masks)
    assert all(np.array_equal(_read(p)[..., 0] > 0, m) for p, m in zip(truth, masks, strict=True))


# ---------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize(("category", "defect"), ALL_PAIRS)
def test_defects_are_visible_and_localized(category: str, defect: str) -> None:
    index = 7
    scale = CATEGORIES[category][1] / 400
    defective, masks = generate_image(category, 0, "test", index, defect)
    good, no_masks = generate_image(category, 0, "test", index, None)
    assert no_masks == []
    assert 1 <= len(masks) <= 2
    diff = np.abs(defective.astype(np.int16) - good.astype(np.int16)).mean(axis=2)
    for mask in masks:
        assert mask.dtype == bool and mask.shape == good.shape[:2]
        assert 150 <= mask.sum() <= 9_000 * scale**2, "a few hundred to a few thousand pixels"
        assert diff[mask].mean() > 8, f"{defect} region hardly differs from the good rendering"
    union = np.logical_or.reduce(masks)
    near = ndimage.binary_dilation(union, iterations=round(15 * scale))
    assert diff[~near].mean() < 0.05, "the defect changes the image far from its mask"


def test_good_images_vary_but_show_the_same_product(tiny: Path) -> None:
    """Two good images differ (pose, lighting, noise) but their edges (the components) line up,
    much better than with another product of the same image size."""

    def edges(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_gradient_magnitude(image[::2, ::2].mean(axis=2), 2.0).ravel()

    def train_image(category: str, index: int) -> np.ndarray:
        return _read(tiny / category / "train" / "good" / f"{index:04d}.png")

    for category, size in CATEGORIES.items():
        a, b = train_image(category, 0), train_image(category, 1)
        assert np.abs(a.astype(np.int16) - b).mean() > 2, "normal images should differ"
        same = np.corrcoef(edges(a), edges(b))[0, 1]
        others = [
            np.corrcoef(edges(a), edges(train_image(other, 0)))[0, 1]
            for other, other_size in CATEGORIES.items()
            if other != category and other_size == size
        ]
        assert same > 0.3 and same > max(others) + 0.2, (category, same, others)


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": "huge"},
        {"categories": ["engine"]},
        {"seed": -1},
        {"seed": 1.5},
        {"categories": []},
        {"workers": 0},
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "out", **{"size": "tiny", "progress": False, **kwargs})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("bolt", 0, "train", 0, None),
        ("tank_screw", 0, "val", 0, None),
        ("tank_screw", 0, "test", 0, "scratch"),
        ("tank_screw", 0, "train", 0, "missing"),
        ("tank_screw", 0, "test", -1, None),
        ("tank_screw", -3, "test", 0, None),
    ],
)
def test_generate_image_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        generate_image(*args)


def test_refuses_foreign_or_mismatched_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_dataset(foreign, size="tiny", categories=["pipe_staple"], progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    ours = generate_dataset(tmp_path / "ours", size="tiny", categories=["pipe_staple"], progress=False)
    with pytest.raises(DataError, match="seed=0"):
        generate_dataset(ours, seed=1, size="tiny", categories=["pipe_staple"], progress=False)
    with pytest.raises(ValueError, match="size"):
        generate_dataset(ours, seed=0, size="small", categories=["pipe_staple"], progress=False)


def test_same_settings_return_early_and_add_missing_categories(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "d", seed=0, size="tiny", categories=["pipe_staple"], progress=False)
    before = _hashes(out)
    stamp = (out / "pipe_staple" / "train" / "good" / "0000.png").stat().st_mtime_ns
    assert generate_dataset(out, seed=0, size="tiny", categories=["pipe_staple"], progress=False) == out
    assert _hashes(out) == before
    assert (out / "pipe_staple" / "train" / "good" / "0000.png").stat().st_mtime_ns == stamp

    # an interrupted run leaves a partial folder; running again finishes the job
    (out / ".partial-pipe_clip").mkdir()
    (out / ".partial-pipe_clip" / "junk.png").write_bytes(b"")
    generate_dataset(out, seed=0, size="tiny", categories=["pipe_staple", "pipe_clip"], progress=False)
    manifest = json.loads((out / "dataset.json").read_text())
    assert sorted(manifest["categories"]) == ["pipe_clip", "pipe_staple"]
    assert not (out / ".partial-pipe_clip").exists()
    assert len(list((out / "pipe_clip" / "train" / "good").iterdir())) == TINY["train"]
