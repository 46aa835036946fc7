"""Meta-learning tasks: sources, task list files, loading, the 70/30 protocol split, episodes, pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedinspect.errors import DataError
from fedinspect.meta.pairs import PairBatch, make_pairs, normalise
from fedinspect.meta.tasks import (
    MetaTask,
    TaskImages,
    choose_references,
    leave_one_out,
    load_task,
    sample_episode,
    split_task,
    target_split,
    task_from_category,
    task_from_folder,
    tasks_from_dirs,
    tasks_from_file,
)
from tests.conftest import save_png, textured_image, write_blob_category

MEAN = np.array([0.485, 0.456, 0.406])  # ImageNet, typed by hand
STD = np.array([0.229, 0.224, 0.225])


def write_folder_task(root: Path, n_good: int = 6, defects: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A folder of labelled images: good/ and one subfolder per defect type, images of varied sizes."""
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        save_png(root / "good" / f"{i:02d}.png", textured_image(rng, 30 + i, 40))
    for defect, count in (defects or {"scratch": 3, "dent": 2}).items():
        for i in range(count):
            save_png(root / defect / f"{i:02d}.png", textured_image(rng, 36, 24 + i))
    return root


def constant_task(n_good: int, n_defective: int, size: int = 16, name: str = "const",
                  values: list[int] | None = None) -> TaskImages:
    """Images that say who they are: image i is the constant ``values[i]`` (default i), so pairs can be identified."""
    task = MetaTask(name, "folder", Path(f"/nowhere/{name}"),
                    tuple(Path(f"/nowhere/{name}/good/{i}.png") for i in range(n_good)),
                    tuple(Path(f"/nowhere/{name}/bad/{i}.png") for i in range(n_defective)))
    n = n_good + n_defective
    values = list(range(n)) if values is None else values
    images = np.repeat(np.array(values, dtype=np.uint8), size * size * 3).reshape(n, size, size, 3)
    return TaskImages(task, images, task.labels)


def identity(normalised: torch.Tensor) -> np.ndarray:
    """The constant value (the image index for :func:`constant_task`) of each normalised image."""
    red = normalised[:, 0, 0, 0].double().numpy()
    return np.rint((red * STD[0] + MEAN[0]) * 255).astype(int)


# ---------------------------------------------------------------------------------------------- sources


def test_category_task_takes_train_and_test_good_as_good(blob_category: Path) -> None:
    task = task_from_category(blob_category)
    assert task.name == "blobs" and task.kind == "mvtec"
    assert len(task.good) == 10 + 7 and len(task.defective) == 14
    assert {p.parent.name for p in task.defective} == {"crack", "stain"}
    assert all(p.parent.name == "good" for p in task.good)
    assert task.labels.tolist() == [0] * 17 + [1] * 14
    assert str(blob_category) in task.source


def test_folder_task_good_folder_and_every_other_folder_defective(tmp_path: Path) -> None:
    task = task_from_folder(write_folder_task(tmp_path / "caps", defects={"scratch": 3, "dent": 2}))
    assert task.name == "caps" and task.kind == "folder"
    assert len(task.good) == 6 and len(task.defective) == 5
    assert {p.parent.name for p in task.defective} == {"scratch", "dent"}


def test_folder_task_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    no_good = tmp_path / "no_good"
    save_png(no_good / "scratch" / "0.png", textured_image(rng, 8, 8))
    with pytest.raises(DataError, match="good"):
        task_from_folder(no_good)
    only_good = tmp_path / "only_good"
    save_png(only_good / "good" / "0.png", textured_image(rng, 8, 8))
    with pytest.raises(DataError, match="no defective image"):
        task_from_folder(only_good)
    loose = write_folder_task(tmp_path / "loose")
    save_png(loose / "stray.png", textured_image(rng, 8, 8))
    with pytest.raises(DataError, match=r"stray\.png"):
        task_from_folder(loose)


def test_category_without_defective_images_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "clean"
    for i in range(3):
        save_png(root / "train" / "good" / f"{i}.png", textured_image(rng, 8, 8))
    save_png(root / "test" / "good" / "0.png", textured_image(rng, 8, 8))
    with pytest.raises(DataError, match="no defective"):
        task_from_category(root)


def test_task_list_file_relative_paths_names_and_kinds(tmp_path: Path) -> None:
    write_blob_category(tmp_path / "data" / "plates", seed=1, n_train=3, n_test=2)
    write_folder_task(tmp_path / "data" / "caps")
    listing = tmp_path / "lists" / "tasks.toml"
    listing.parent.mkdir()
    listing.write_text('[[task]]\nname = "steel"\npath = "../data/plates"\nkind = "mvtec"\n\n'
                       '[[task]]\npath = "../data/caps"\nkind = "folder"\n')
    tasks = tasks_from_file(listing)
    assert [t.name for t in tasks] == ["steel", "caps"]
    assert [t.kind for t in tasks] == ["mvtec", "folder"]
    assert tasks[0].root.resolve() == (tmp_path / "data" / "plates").resolve()
    assert (len(tasks[0].good), len(tasks[0].defective)) == (5, 4)
    assert all(t.listed_in == listing for t in tasks) and str(listing) in tasks[1].source
    assert [t.name for t in tasks_from_dirs([listing])] == ["steel", "caps"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[task]]\npath = "missing"\nkind = "folder"\n', r"entry 1 \('missing'\): folder .*missing not found"),
        ('[[task]]\nname = "a"\npath = "caps"\nkind = "folder"\n[[task]]\nname = "a"\npath = "empty"\nkind = "mvtec"\n',
         r"entry 2 \('a'\): .*no defective"),
        ('[[task]]\nname = "a"\npath = "caps"\nkind = "folder"\n'
         '[[task]]\nname = "a"\npath = "caps2"\nkind = "folder"\n',
         r"entry 2 \('a'\): task name 'a' already used by \[\[task\]\] entry 1"),
        ('[[task]]\npath = "caps"\nkind = "voc"\n', r"entry 1: kind 'voc' is not one of mvtec, folder"),
        ('[[task]]\npath = "caps"\n', r"entry 1: missing key 'kind'"),
        ('[[task]]\npath = "caps"\nkind = "folder"\nlabel = 3\n', r"entry 1: unknown key\(s\) label"),
        ('[[tasks]]\npath = "caps"\nkind = "folder"\n', r"unknown top-level key\(s\) tasks"),
        ('[[task]]\npath = "caps\nkind = "folder"\n', r"not a readable TOML task list"),
        ("", r"no \[\[task\]\] table"),
        ('[[task]]\npath = "caps"\nkind = "folder"\nname = 5\n', r"entry 1: 'name' must be a non-empty string"),
    ],
)
def test_task_list_file_errors_name_the_file_and_entry(tmp_path: Path, body: str, message: str) -> None:
    write_folder_task(tmp_path / "caps")
    write_folder_task(tmp_path / "caps2")
    rng = np.random.default_rng(0)
    for i in range(3):
        save_png(tmp_path / "empty" / "train" / "good" / f"{i}.png", textured_image(rng, 8, 8))
    save_png(tmp_path / "empty" / "test" / "good" / "0.png", textured_image(rng, 8, 8))
    listing = tmp_path / "tasks.toml"
    listing.write_text(body)
    with pytest.raises(DataError, match=message) as caught:
        tasks_from_file(listing)
    assert caught.value.path == listing
    assert str(listing) in str(caught.value)


def test_tasks_from_dirs_categories_datasets_and_collections(tmp_path: Path) -> None:
    write_blob_category(tmp_path / "factory_a" / "plates", seed=1, n_train=3, n_test=2)
    write_blob_category(tmp_path / "factory_a" / "tiles", seed=2, n_train=3, n_test=2)
    write_blob_category(tmp_path / "collection" / "dataset_b" / "bolts", seed=3, n_train=3, n_test=2)
    write_folder_task(tmp_path / "caps")
    tasks = tasks_from_dirs([tmp_path / "factory_a", tmp_path / "collection", tmp_path / "caps"])
    assert [t.name for t in tasks] == ["plates", "tiles", "bolts", "caps"]
    assert [t.kind for t in tasks] == ["mvtec", "mvtec", "mvtec", "folder"]
    assert [t.name for t in tasks_from_dirs([tmp_path / "caps"])] == ["caps"]
    with pytest.raises(DataError, match="task name 'tiles' already used"):
        tasks_from_dirs([tmp_path / "factory_a", tmp_path / "factory_a" / "tiles"])
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no task found"):
        tasks_from_dirs([tmp_path / "nothing"])
    with pytest.raises(DataError, match="not found"):
        tasks_from_dirs([tmp_path / "absent"])


def test_synthetic_dataset_gives_its_six_categories(tiny_dataset: Path) -> None:
    tasks = tasks_from_dirs([tiny_dataset])
    assert len(tasks) == 6
    assert all((len(t.good), len(t.defective)) == (6, 2) for t in tasks)  # tiny: 4 train + 2 good, 2 defective


def test_real_folders_give_three_tasks(real_data: Path) -> None:
    tasks = {t.name: t for t in tasks_from_dirs([real_data])}
    counts = {name: (len(t.good), len(t.defective)) for name, t in tasks.items()}
    assert counts == {"glass_chip": (18, 80), "metal_plate": (80, 71), "magnetic_tile": (581, 392)}


def test_leave_one_out_never_lets_the_target_in(tmp_path: Path) -> None:
    for seed, name in enumerate(("plates", "tiles", "bolts")):
        write_blob_category(tmp_path / "data" / name, seed=seed, n_train=3, n_test=2)
    tasks = tasks_from_dirs([tmp_path / "data"])
    for target in tasks:
        meta_tasks, held_out = leave_one_out(tasks, target.name)
        assert held_out is target
        assert target.name not in {t.name for t in meta_tasks} and len(meta_tasks) == 2
        target_paths = {p.resolve() for p in target.paths}
        assert all(p.resolve() not in target_paths for t in meta_tasks for p in t.paths)
    twin = task_from_category(tmp_path / "data" / "tiles", name="tiles_again")
    with pytest.raises(DataError, match="left-out task 'tiles'"):
        leave_one_out([*tasks, twin], "tiles")
    with pytest.raises(ValueError, match="not among the tasks"):
        leave_one_out(tasks, "screws")


# ---------------------------------------------------------------------------------------------- loading


def test_load_squashes_to_the_square_like_pil(tmp_path: Path) -> None:
    root = write_folder_task(tmp_path / "caps")
    task = task_from_folder(root)
    loaded = load_task(task, image_size=20, workers=2)
    assert loaded.images.shape == (11, 20, 20, 3) and loaded.images.dtype == np.uint8
    assert loaded.labels.tolist() == task.labels.tolist()
    expected = np.asarray(Image.open(task.good[3]).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(loaded.images[3], expected)
    np.testing.assert_array_equal(load_task(task, image_size=20, workers=1).images, loaded.images)
    assert loaded.nbytes == 11 * 20 * 20 * 3


def test_letterbox_keeps_the_aspect_ratio_with_mean_colour_bars(tmp_path: Path) -> None:
    root = tmp_path / "tall"
    save_png(root / "good" / "0.png", np.full((40, 20, 3), 200, np.uint8))  # twice as tall as wide
    save_png(root / "good" / "1.png", np.full((40, 40, 3), 200, np.uint8))
    save_png(root / "bad" / "0.png", np.full((40, 40, 3), 10, np.uint8))
    loaded = load_task(task_from_folder(root), image_size=16, resize="letterbox", workers=1)
    tall = loaded.images[0]
    np.testing.assert_array_equal(tall[:, 4:12], 200)  # 20/40 * 16 = 8 columns, centred
    np.testing.assert_array_equal(tall[:, :4], np.broadcast_to(np.round(MEAN * 255).astype(np.uint8), (16, 4, 3)))
    assert normalise(torch.from_numpy(tall[None].copy()))[0, :, 0, 0].abs().max() < 0.01  # the bars normalise to ~0


def test_a_corrupt_image_is_an_error_naming_it(tmp_path: Path) -> None:
    root = write_folder_task(tmp_path / "caps")
    broken = root / "dent" / "01.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"01\.png") as caught:
        load_task(task_from_folder(root), image_size=16, workers=2)
    assert caught.value.path == broken


def test_load_rejects_bad_settings(tmp_path: Path) -> None:
    task = task_from_folder(write_folder_task(tmp_path / "caps"))
    with pytest.raises(ValueError, match="image_size"):
        load_task(task, image_size=8)
    with pytest.raises(ValueError, match="resize"):
        load_task(task, resize="crop")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- split


def test_split_is_seeded_stratified_and_disjoint() -> None:
    images = constant_task(n_good=20, n_defective=9)
    split = split_task(images, seed=5)
    again = split_task(images, seed=5)
    np.testing.assert_array_equal(split.pool, again.pool)
    np.testing.assert_array_equal(split.holdout, again.holdout)
    assert not np.array_equal(split.pool, split_task(images, seed=6).pool)
    assert set(split.pool).isdisjoint(split.holdout) and len(split.pool) + len(split.holdout) == 29
    labels = images.labels
    assert (labels[split.pool] == 0).sum() == 14 and (labels[split.pool] == 1).sum() == 6  # round(0.7 * 9) = 6
    assert (labels[split.holdout] == 0).sum() == 6 and (labels[split.holdout] == 1).sum() == 3


def test_split_depends_on_the_task_not_its_neighbours() -> None:
    a, b = constant_task(12, 8, name="a"), constant_task(12, 8, name="b")
    assert not np.array_equal(split_task(a, 0).pool, split_task(b, 0).pool)  # named streams
    np.testing.assert_array_equal(split_task(a, 0).pool, split_task(constant_task(12, 8, name="a"), 0).pool)


def test_split_refuses_too_small_tasks_and_keeps_minimums() -> None:
    with pytest.raises(DataError, match="at least 3 good and 2 defective"):
        split_task(constant_task(2, 5), seed=0)
    split = split_task(constant_task(3, 2), seed=0)
    labels = split.images.labels
    assert (labels[split.pool] == 0).sum() == 2 and (labels[split.holdout] == 1).sum() == 1


# ---------------------------------------------------------------------------------------------- pairs


def test_episode_draws_balanced_pairs_from_the_right_pools() -> None:
    images = constant_task(n_good=30, n_defective=12)
    split = split_task(images, seed=1)
    pool_good = set(split.good(split.pool).tolist())
    for reference in ("random", "nearest"):
        episode = sample_episode(split, np.random.default_rng(3), n_support=16, n_query=10, reference=reference)
        assert (len(episode.support), len(episode.query)) == (16, 10)
        for batch, source in ((episode.support, split.pool), (episode.query, split.holdout)):
            tests, refs = identity(batch.test), identity(batch.reference)
            assert set(tests) <= set(source.tolist())
            assert set(refs) <= pool_good
            assert np.all(tests != refs)
            np.testing.assert_array_equal(batch.label.numpy(), images.labels[tests])
            assert batch.label.sum().item() == len(batch) // 2


def test_episode_is_reproducible_and_repeats_a_short_class() -> None:
    split = split_task(constant_task(n_good=10, n_defective=4), seed=0)  # pool: 7 good, 3 defective
    first = sample_episode(split, np.random.default_rng(9), n_support=12, n_query=4, reference="random")
    second = sample_episode(split, np.random.default_rng(9), n_support=12, n_query=4, reference="random")
    for a, b in ((first.support, second.support), (first.query, second.query)):
        assert torch.equal(a.test, b.test) and torch.equal(a.reference, b.reference)
    defective = identity(first.support.test)[first.support.label.numpy() == 1]
    assert len(defective) == 6 and set(defective) == set(split.defective(split.pool).tolist())  # all 3, then repeats
    unbalanced = sample_episode(split, np.random.default_rng(9), n_support=10, balanced=False, reference="random")
    assert sorted(identity(unbalanced.support.test)) == sorted(split.pool.tolist())  # the whole pool, once each


def test_nearest_reference_by_thumbnail_and_never_itself() -> None:
    images = constant_task(n_good=5, n_defective=1, values=[10, 50, 52, 90, 200, 53])  # image 5 is closest to 52
    pool_good = np.array([0, 1, 2, 3])
    refs = choose_references(images, np.array([5, 2, 0, 4]), pool_good, "nearest", np.random.default_rng(0))
    np.testing.assert_array_equal(refs[:, 0, 0, 0], [52, 50, 50, 90])  # 2 skips itself; 4 is not in the pool
    tie = constant_task(n_good=5, n_defective=1, values=[10, 50, 52, 90, 200, 51])  # 51: as far from 50 as from 52
    assert choose_references(tie, np.array([5]), pool_good, "nearest", np.random.default_rng(0))[0, 0, 0, 0] == 50
    with pytest.raises(ValueError, match="read-only"):
        images.images[0] = 0  # loaded images cannot change under their cached thumbnails


def test_mean_reference_leaves_the_test_image_out() -> None:
    images = constant_task(n_good=4, n_defective=1, values=[10, 20, 61, 100, 7])
    refs = choose_references(images, np.array([4, 2]), np.array([0, 1, 2]), "mean", np.random.default_rng(0))
    assert refs[0, 0, 0, 0] == round((10 + 20 + 61) / 3)  # 30.33 -> 30
    assert refs[1, 0, 0, 0] == 15  # (10 + 20) / 2, without image 2 itself


def test_random_reference_is_uniform_over_the_others() -> None:
    images = constant_task(n_good=4, n_defective=1)
    refs = choose_references(images, np.full(4000, 1), np.array([0, 1, 2, 3]), "random", np.random.default_rng(0))
    counts = np.bincount(refs[:, 0, 0, 0], minlength=4)
    assert counts[1] == 0 and counts[[0, 2, 3]].min() > 1200
    with pytest.raises(DataError, match="not enough good images"):
        choose_references(images, np.array([0]), np.array([0]), "random", np.random.default_rng(0))
    with pytest.raises(ValueError, match="reference must be one of"):
        choose_references(images, np.array([4]), np.array([0]), "median", np.random.default_rng(0))  # type: ignore
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        choose_references(images, np.array([4]), np.array([0]), "random", 0)  # type: ignore[arg-type]


def test_target_split_shots_validation_and_test() -> None:
    images = constant_task(n_good=40, n_defective=20)
    split = split_task(images, seed=2)  # pool: 28 good, 14 defective
    target = target_split(split, np.random.default_rng(4), shots=20, validation_fraction=0.2)
    labels = images.labels
    shots = np.concatenate([target.fit, target.validation])
    assert len(shots) == 20 and set(shots) <= set(split.pool.tolist()) and len(set(shots)) == 20
    assert (labels[shots] == 0).sum() == 13  # round(20 * 28 / 42)
    assert set(labels[target.validation]) == {0, 1} and set(target.fit).isdisjoint(target.validation)
    np.testing.assert_array_equal(target.test, split.holdout)
    fit_pairs, validation_pairs = target.train_pairs(np.random.default_rng(0), reference="random")
    test_pairs = target.test_pairs(np.random.default_rng(0), reference="random")
    fit_good = set(split.good(target.fit).tolist())
    for batch, source in ((fit_pairs, target.fit), (validation_pairs, target.validation), (test_pairs, target.test)):
        np.testing.assert_array_equal(identity(batch.test), source)
        assert set(identity(batch.reference)) <= fit_good and np.all(identity(batch.test) != identity(batch.reference))
    same = target_split(split, np.random.default_rng(4), shots=20)
    np.testing.assert_array_equal(same.fit, target.fit)
    whole = target_split(split, np.random.default_rng(4))
    assert len(whole.fit) + len(whole.validation) == len(split.pool)
    with pytest.raises(ValueError, match="holds 42 images"):
        target_split(split, np.random.default_rng(0), shots=50)


def test_pair_batch_normalisation_by_hand() -> None:
    reference = np.zeros((2, 4, 5, 3), np.uint8)
    test = np.zeros((2, 4, 5, 3), np.uint8)
    test[1, 2, 3] = (255, 128, 0)
    batch = make_pairs(torch.from_numpy(reference), torch.from_numpy(test), [0, 1])
    assert batch.test.shape == (2, 3, 4, 5) and batch.test.dtype == torch.float32 and len(batch) == 2
    expected = (np.array([255, 128, 0]) / 255 - MEAN) / STD  # (2.2489, 0.2429, -1.8044)
    np.testing.assert_allclose(batch.test[1, :, 2, 3].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(batch.reference[0, :, 0, 0].numpy(), -MEAN / STD, rtol=1e-5)
    assert batch.label.tolist() == [0.0, 1.0] and batch.label.dtype == torch.float32
    assert torch.equal(normalise(torch.from_numpy(test).permute(0, 3, 1, 2)), batch.test)  # NCHW accepted too
    both = PairBatch.concat([batch, batch.to("cpu")])
    assert len(both) == 4 and torch.equal(both.test[2:], batch.test)


def test_pair_batch_refuses_inconsistent_tensors() -> None:
    image = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        PairBatch(image, torch.zeros(2, 3, 4, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="label must be a \\(2,\\) tensor"):
        PairBatch(image, image, torch.zeros(3))
    with pytest.raises(ValueError, match="float32"):
        PairBatch(image.double(), image.double(), torch.zeros(2))
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        make_pairs(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(1, 4, 4, 3, dtype=torch.uint8), [2])
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros(1, 4, 4, 3))


def test_an_episode_is_the_support_query_pair_meta_loss_takes(one_torch_thread: None) -> None:
    from fedinspect.meta.maml import meta_loss, trainable_parameters
    from fedinspect.meta.model import MeDetectionNet

    torch.manual_seed(0)
    split = split_task(constant_task(n_good=10, n_defective=6, size=32), seed=0)
    episode = sample_episode(split, np.random.default_rng(0), n_support=8, n_query=4)
    support, query = episode
    assert support is episode.support and query is episode.query
    model = MeDetectionNet(width=4)
    loss = meta_loss(model, trainable_parameters(model), [episode], inner_steps=1, inner_lr=1e-3, first_order=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
