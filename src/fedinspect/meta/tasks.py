"""Product tasks for meta-learning: where their images come from, and how episodes and evaluation sets are drawn.

A :class:`MetaTask` is one product: its good and its defective image paths. Tasks come from

- a category folder in the MVTec AD layout (the AutoVI layout is detected too, see
  :class:`fedinspect.data.dataset.CategoryDataset`): ``train/good`` and ``test/good`` are good,
  every other ``test/<defect>`` folder is defective (the category reader also requires the
  defects' ground-truth masks, as it does everywhere in fedinspect);
- a folder of labelled images: ``good/`` holds the good images and *every other subfolder* holds
  defective ones (its name is the defect type; only the images directly inside it count);
- a task list file (TOML) naming either kind, see :func:`tasks_from_file`.

:func:`load_task` reads a task's images once, resized to a square ``image_size`` and kept as uint8.
The default resize *squashes* (stretches) each image to the square, as the seed does: letterboxing
would put padding bars at places that depend on each image's aspect ratio (the magnetic tiles range
from 0.36 to 2.7), so a test image and its reference would differ at the bars whatever their
content, the very difference the Siamese model is meant to read as a defect; and a 0.36 image
letterboxed into 128 pixels keeps only 46 columns. ``resize="letterbox"`` is there for products whose
geometry must not be distorted (the bars take ImageNet's mean colour, which normalises to zero).

The protocol (seed 002): each task's images are split 70/30, seeded and stratified by label
(:func:`split_task`). For a meta-training task the 70% share is the support pool and the 30% the query
pool, and :func:`sample_episode` draws 64 support and 20 query pairs from them. For the left-out target
task, :func:`target_split` takes the 70% share (or ``shots`` images of it) to fine-tune on, with a
validation share for early stopping, and the 30% share to test on. :func:`leave_one_out` separates the
target from the meta-training tasks and refuses any image the two would share.

Every pair's reference is a good image of the same task's support (or fit) pool, never the image under
test itself, chosen by the rule ``reference``: ``"random"`` (uniform), ``"nearest"`` (closest in a
16x16 grayscale thumbnail) or ``"mean"`` (the mean image of the pool's good images, leaving the image
under test out when it is one of them). See :data:`DEFAULT_REFERENCE` for the default and why.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import numpy as np
import torch
from PIL import Image

from fedinspect.backbones.wide_resnet import IMAGENET_MEAN
from fedinspect.data.dataset import GOOD, CategoryDataset
from fedinspect.data.images import list_images, read_image
from fedinspect.errors import DataError
from fedinspect.meta.pairs import PairBatch, make_pairs

TaskKind = Literal["mvtec", "folder"]
ReferenceRule = Literal["random", "nearest", "mean"]
ResizeMode = Literal["squash", "letterbox"]

TASK_KINDS: tuple[str, ...] = ("mvtec", "folder")
REFERENCE_RULES: tuple[str, ...] = ("random", "nearest", "mean")
RESIZE_MODES: tuple[str, ...] = ("squash", "letterbox")
DEFAULT_IMAGE_SIZE = 128
"""Square side in pixels (the seed used 256; 128 keeps CPU meta-training affordable)."""
SUPPORT_FRACTION = 0.7
"""The seed's support:query split, 7:3."""
N_SUPPORT = 64
N_QUERY = 20
DEFAULT_REFERENCE: ReferenceRule = "nearest"
"""``"nearest"``: the seed pairs a normal sample with the sample under test without saying which; the
nearest good image (16x16 grayscale thumbnail) shares the test image's pose, lighting and, once
squashed, aspect ratio best, so their difference is mostly the defect, and the choice is deterministic,
so an evaluation does not depend on a draw. ``"random"`` varies the pairs between episodes (a kind of
augmentation); ``"mean"`` is one blurred template per task."""
THUMBNAIL_SIZE = 16
_TASK_KEYS = {"name", "path", "kind"}


# --------------------------------------------------------------------------------------------------
# Tasks: names and image paths


@dataclass(frozen=True)
class MetaTask:
    """One product: its name, where it came from, and its good and defective image paths (sorted)."""

    name: str
    kind: TaskKind
    root: Path
    good: tuple[Path, ...]
    defective: tuple[Path, ...]
    listed_in: Path | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError(self.root, "a task needs a non-empty name")
        if not self.good:
            raise DataError(self.root, f"task {self.name!r} has no good image")
        if not self.defective:
            raise DataError(self.root, f"task {self.name!r} has no defective image")

    @property
    def source(self) -> str:
        """Where the task came from, for reports: its kind and folder, and the list file naming it."""
        text = f"{self.kind} folder {self.root}"
        return text if self.listed_in is None else f"{text} (listed in {self.listed_in})"

    @property
    def paths(self) -> tuple[Path, ...]:
        """All image paths: the good ones first, then the defective ones."""
        return self.good + self.defective

    @property
    def labels(self) -> np.ndarray:
        """0 (good) / 1 (defective) per path of :attr:`paths`."""
        return np.concatenate([np.zeros(len(self.good), np.int64), np.ones(len(self.defective), np.int64)])

    def __repr__(self) -> str:
        return f"MetaTask({self.name!r}, {self.kind}, good={len(self.good)}, defective={len(self.defective)})"


def task_from_category(root: str | Path, name: str | None = None) -> MetaTask:
    """A task from one category folder (MVTec or AutoVI layout): train/good, test/good good; test/<defect> defective."""
    dataset = CategoryDataset(root)
    good = tuple(sample.image_path for sample in dataset.train + dataset.test if not sample.label)
    defective = tuple(sample.image_path for sample in dataset.test if sample.label)
    if not defective:
        raise DataError(dataset.root / "test", "no defective test image: a meta-learning task needs both classes")
    return MetaTask(name or dataset.name, "mvtec", dataset.root, good, defective)


def task_from_folder(root: str | Path, name: str | None = None) -> MetaTask:
    """A task from a folder of labelled images: ``good/`` is good, every other subfolder is defective.

    Images lying directly in ``root`` are refused (their label would be a guess); hidden folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "task folder not found")
    good_dir = root / GOOD
    if not good_dir.is_dir():
        raise DataError(good_dir, "missing folder: a folder of labelled images needs good/ (every other subfolder "
                                  "holds defective images)")
    loose = list_images(root)
    if loose:
        raise DataError(loose[0], f"image outside any label folder ({len(loose)} such in {root}): move it into "
                                  "good/ or a defect subfolder")
    good = tuple(list_images(good_dir))
    if not good:
        raise DataError(good_dir, "no good image found")
    defective: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != GOOD and not p.name.startswith(".")):
        defective.extend(list_images(folder))
    if not defective:
        raise DataError(root, "no defective image: put them in subfolders other than good/ (one per defect type)")
    return MetaTask(name or root.name, "folder", root, good, tuple(defective))


def tasks_from_file(path: str | Path) -> list[MetaTask]:
    """The tasks of a TOML task list; every problem is a :class:`DataError` naming the file and the entry.

    ::

        [[task]]
        name = "bottle"              # optional: the folder's name
        path = "mvtec/bottle"        # relative to this file (or absolute)
        kind = "mvtec"               # "mvtec" (a category, AutoVI layout detected) or "folder"
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "task list file not found")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise DataError(path, f"not a readable TOML task list ({error})") from error
    unknown = sorted(set(document) - {"task"})
    if unknown:
        raise DataError(path, f"unknown top-level key(s) {', '.join(unknown)}; expected only [[task]] tables")
    entries = document.get("task")
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "no [[task]] table found")
    tasks: list[MetaTask] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries, start=1):
        where = f"[[task]] entry {number}"
        if not isinstance(entry, dict):
            raise DataError(path, f"{where} is not a table")
        extra = sorted(set(entry) - _TASK_KEYS)
        if extra:
            raise DataError(path, f"{where}: unknown key(s) {', '.join(extra)} (allowed: kind, name, path)")
        for key in ("path", "kind"):
            if key not in entry:
                raise DataError(path, f"{where}: missing key {key!r}")
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise DataError(path, f"{where}: {key!r} must be a non-empty string, got {entry[key]!r}")
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise DataError(path, f"{where}: 'name' must be a non-empty string, got {name!r}")
        kind = entry["kind"]
        if kind not in TASK_KINDS:
            raise DataError(path, f"{where}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}")
        folder = Path(entry["path"]).expanduser()
        folder = folder if folder.is_absolute() else path.parent / folder
        label = f"{where} ({name or folder.name!r})"
        if not folder.is_dir():
            raise DataError(path, f"{label}: folder {folder} not found")
        try:
            task = task_from_category(folder, name) if kind == "mvtec" else task_from_folder(folder, name)
        except DataError as error:
            raise DataError(path, f"{label}: {error}") from error
        if task.name in seen:
            raise DataError(path, f"{label}: task name {task.name!r} already used by [[task]] entry {seen[task.name]}")
        seen[task.name] = number
        tasks.append(MetaTask(task.name, task.kind, task.root, task.good, task.defective, path))
    return tasks


def _discover(folder: Path, depth: int) -> list[MetaTask]:
    """Tasks under ``folder``: a category, a labelled folder, or (``depth`` levels down) folders holding them."""
    if (folder / "train").is_dir():
        return [task_from_category(folder)]
    if (folder / GOOD).is_dir():
        return [task_from_folder(folder)]
    if (folder / "test").is_dir() or (folder / "ground_truth").is_dir():
        raise DataError(folder / "train", "missing folder: a category with test/ or ground_truth/ needs train/good")
    if depth == 0:
        return []
    found: list[MetaTask] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(_discover(sub, depth - 1))
    return found


def tasks_from_dirs(dirs: Iterable[str | Path]) -> list[MetaTask]:
    """Every task found in ``dirs``, in order, names unique.

    Each entry may be a category folder (holds ``train/``), a folder of labelled images (holds ``good/``),
    a dataset folder whose subfolders are categories (e.g. the six synthetic categories of
    :func:`fedinspect.data.synthetic.generate_dataset`) or a collection of such datasets one level further
    down (``../shared/data/real`` holds ``mtd/magnetic_tile`` ...), or a ``.toml`` task list.
    """
    tasks: list[MetaTask] = []
    origin: dict[str, Path] = {}
    for entry in dirs:
        entry = Path(entry)
        if entry.suffix.lower() == ".toml":
            found = tasks_from_file(entry)
        elif not entry.is_dir():
            raise DataError(entry, "data folder not found")
        else:
            found = _discover(entry, depth=2)
            if not found:
                raise DataError(entry, "no task found: expected a category (train/, test/), a folder of labelled "
                                       "images (good/ and defect subfolders), or folders holding them")
        for task in found:
            if task.name in origin:
                raise DataError(task.root, f"task name {task.name!r} already used by {origin[task.name]}; "
                                           "rename one (a task list file can name it)")
            origin[task.name] = task.root
            tasks.append(task)
    return tasks


def leave_one_out(tasks: Sequence[MetaTask], target: str | MetaTask) -> tuple[list[MetaTask], MetaTask]:
    """(the meta-training tasks, the target): every task but ``target``, refusing any image they share with it.

    Images are compared by resolved path, so the same folder listed twice under two names is caught.
    """
    name = target.name if isinstance(target, MetaTask) else target
    matches = [task for task in tasks if task.name == name]
    if not matches:
        raise ValueError(f"target task {name!r} is not among the tasks ({', '.join(t.name for t in tasks)})")
    if len(matches) > 1:
        raise ValueError(f"task name {name!r} appears {len(matches)} times; task names must be unique")
    target_task = matches[0]
    held_out = {p.resolve() for p in target_task.paths}
    meta_tasks = [task for task in tasks if task.name != name]
    for task in meta_tasks:
        shared = [p for p in task.paths if p.resolve() in held_out]
        if shared:
            raise DataError(shared[0], f"image of meta-training task {task.name!r} is also an image of the "
                                       f"left-out task {name!r} ({len(shared)} shared); it would leak the target")
    return meta_tasks, target_task


# --------------------------------------------------------------------------------------------------
# Loaded images


def _squash(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _letterbox(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def _thumbnail(image: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(image).convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float32).reshape(-1)


@dataclass(frozen=True, eq=False)
class TaskImages:
    """A task's images read once: uint8 (n, S, S, 3), their 0/1 labels and paths (good first), and thumbnails."""

    task: MetaTask
    images: np.ndarray
    labels: np.ndarray
    resize: ResizeMode = "squash"

    def __post_init__(self) -> None:
        """Check the arrays against the task and make them read-only (the thumbnails are cached from them)."""
        n = len(self.task.paths)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[0] != n \
                or self.images.shape[1] != self.images.shape[2] or self.images.shape[3] != 3:
            raise ValueError(f"task {self.task.name!r}: images must be uint8 ({n}, S, S, 3), "
                             f"got {self.images.dtype} {self.images.shape}")
        if not np.array_equal(self.labels, self.task.labels):
            raise ValueError(f"task {self.task.name!r}: labels disagree with the task's good/defective paths")
        self.images.setflags(write=False)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def paths(self) -> tuple[Path, ...]:
        return self.task.paths

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @cached_property
    def thumbnails(self) -> np.ndarray:
        """The "nearest" rule's descriptor: a 16x16 grayscale thumbnail per image, float32 (n, 256)."""
        return np.stack([_thumbnail(image) for image in self.images])


def _read_resized(path: Path, size: int, resize: ResizeMode) -> np.ndarray:
    image = read_image(path)
    return _squash(image, size) if resize == "squash" else _letterbox(image, size)


def load_task(task: MetaTask, image_size: int = DEFAULT_IMAGE_SIZE, resize: ResizeMode = "squash",
              workers: int | None = None) -> TaskImages:
    """Read ``task``'s images once, resized to ``image_size`` square (``resize``: "squash" or "letterbox").

    ``workers`` threads read in parallel (default: the available cores, at most 4); the result does not
    depend on it. An unreadable image raises a :class:`DataError` naming it.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < THUMBNAIL_SIZE:
        raise ValueError(f"image_size must be an integer >= {THUMBNAIL_SIZE}, got {image_size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    paths = task.paths
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    if workers == 1:
        for index, path in enumerate(paths):
            images[index] = _read_resized(path, image_size, resize)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for index, image in enumerate(pool.map(lambda p: _read_resized(p, image_size, resize), paths)):
                images[index] = image
    return TaskImages(task, images, task.labels, resize)


def load_tasks(tasks: Sequence[MetaTask], image_size: int = DEFAULT_IMAGE_SIZE, resize: ResizeMode = "squash",
               workers: int | None = None) -> dict[str, TaskImages]:
    """:func:`load_task` for each task, by name."""
    return {task.name: load_task(task, image_size, resize, workers) for task in tasks}


# --------------------------------------------------------------------------------------------------
# The protocol split, episodes and target sets


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (seeded by the caller), got {type(rng).__name__}")
    return rng


def _check_rule(reference: str) -> None:
    if reference not in REFERENCE_RULES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCE_RULES)}, got {reference!r}")


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def task_rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A generator for one task and purpose from the caller's seed: the same whatever the other tasks are."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(purpose.encode())])


@dataclass(frozen=True, eq=False)
class TaskSplit:
    """A task's protocol split: ``pool`` (70%: the support pool, or a target's training share) and ``holdout`` (30%)."""

    images: TaskImages
    pool: np.ndarray
    holdout: np.ndarray
    seed: int = 0

    @property
    def name(self) -> str:
        return self.images.name

    def good(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.images.labels[indices] == 0]

    def defective(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.images.labels[indices] == 1]


def split_task(images: TaskImages, seed: int, support_fraction: float = SUPPORT_FRACTION) -> TaskSplit:
    """The seeded split of a task, stratified by label: ``round(fraction * n)`` of each class into the pool.

    The generator comes from ``(seed, task name)``, so a task splits the same way in every leave-one-out
    fold. The pool keeps at least 2 good images (a good image needs another one as its reference) and each
    share at least one image of each class; a task with fewer than 3 good or 2 defective images is refused.
    """
    if not 0 < support_fraction < 1:
        raise ValueError(f"support_fraction must be in (0, 1), got {support_fraction!r}")
    labels = images.labels
    n_good, n_defective = int((labels == 0).sum()), int((labels == 1).sum())
    if n_good < 3 or n_defective < 2:
        raise DataError(images.task.root, f"task {images.name!r} has {n_good} good and {n_defective} defective "
                                          "images; the split needs at least 3 good and 2 defective")
    rng = task_rng(seed, images.name, "split")
    pool, holdout = [], []
    for label, minimum in ((0, 2), (1, 1)):
        members = np.flatnonzero(labels == label)
        k = min(max(_round(support_fraction * len(members)), minimum), len(members) - 1)
        order = rng.permutation(members)
        pool.append(order[:k])
        holdout.append(order[k:])
    return TaskSplit(images, np.sort(np.concatenate(pool)), np.sort(np.concatenate(holdout)), seed)


def _draw(members: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``members`` without replacement; when there are fewer, all of them and then repeats."""
    if count <= len(members):
        return rng.choice(members, size=count, replace=False)
    return np.concatenate([rng.permutation(members), rng.choice(members, size=count - len(members), replace=True)])


def _draw_pairs(split: TaskSplit, indices: np.ndarray, count: int, balanced: bool,
                rng: np.random.Generator) -> np.ndarray:
    if balanced:
        good, defective = split.good(indices), split.defective(indices)
        if len(good) == 0 or len(defective) == 0:
            raise DataError(split.images.task.root, f"task {split.name!r}: a share lacks a class, no balanced draw")
        chosen = np.concatenate([_draw(good, count - count // 2, rng), _draw(defective, count // 2, rng)])
    else:
        chosen = _draw(indices, count, rng)
    return rng.permutation(chosen)


def choose_references(images: TaskImages, tests: np.ndarray, pool_good: np.ndarray, reference: ReferenceRule,
                      rng: np.random.Generator) -> np.ndarray:
    """The reference images (uint8 (n, S, S, 3)) for the images ``tests``, from the good images ``pool_good``.

    ``random``: uniform over the pool's good images other than the test image; ``nearest``: the one
    closest in the 16x16 grayscale thumbnail (Euclidean; ties to the lowest index), other than the test
    image; ``mean``: the rounded mean of the pool's good images, without the test image when it is one.
    """
    _check_rule(reference)
    _check_rng(rng)
    pool_good = np.asarray(pool_good)
    tests = np.asarray(tests)
    if len(pool_good) == 0 or (len(pool_good) == 1 and np.isin(pool_good, tests).any()):
        raise DataError(images.task.root, f"task {images.name!r}: not enough good images for references")
    position = {int(index): at for at, index in enumerate(pool_good)}
    own = np.array([position.get(int(t), -1) for t in tests])
    if reference == "random":
        m = len(pool_good)
        draws = rng.integers(0, np.where(own >= 0, m - 1, m))
        draws = np.where((own >= 0) & (draws >= own), draws + 1, draws)
        return images.images[pool_good[draws]]
    if reference == "nearest":
        thumbs = images.thumbnails
        distances = ((thumbs[tests][:, None, :] - thumbs[pool_good][None, :, :]) ** 2).sum(axis=2)
        distances[own >= 0, own[own >= 0]] = np.inf
        return images.images[pool_good[np.argmin(distances, axis=1)]]
    total = images.images[pool_good].astype(np.int64).sum(axis=0)
    count = len(pool_good)
    references = np.empty((len(tests), *images.images.shape[1:]), np.uint8)
    for row, (test, at) in enumerate(zip(tests, own, strict=True)):
        mean = (total - images.images[test]) / (count - 1) if at >= 0 else total / count
        references[row] = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return references


def pairs_for(images: TaskImages, tests: np.ndarray, pool_good: np.ndarray, reference: ReferenceRule,
              rng: np.random.Generator) -> PairBatch:
    """The normalised pairs of the images ``tests``, references from ``pool_good`` (:func:`choose_references`)."""
    tests = np.asarray(tests, dtype=np.int64)
    references = choose_references(images, tests, pool_good, reference, rng)
    return make_pairs(torch.from_numpy(references), torch.from_numpy(images.images[tests]),
                      images.labels[tests].tolist())


class Episode(NamedTuple):
    """One meta-training draw of a task: support pairs for the inner loop, query pairs for the outer loss.

    A (support, query) tuple, the episode :func:`fedinspect.meta.maml.meta_loss` takes.
    """

    support: PairBatch
    query: PairBatch


def sample_episode(split: TaskSplit, rng: np.random.Generator, n_support: int = N_SUPPORT, n_query: int = N_QUERY,
                   reference: ReferenceRule = DEFAULT_REFERENCE, balanced: bool = True) -> Episode:
    """``n_support`` pairs from the support pool and ``n_query`` from the query pool, references from the support pool.

    ``balanced``: half good, half defective (good takes the odd one). A class with fewer images than its
    half is used whole and then repeated (drawn with replacement) to fill it, each repeat with its own
    reference draw under "random"; ``balanced=False`` draws from the pool as it is, with repeats only
    when the pool is smaller than the count.
    """
    _check_rng(rng)
    _check_rule(reference)
    for what, count in (("n_support", n_support), ("n_query", n_query)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{what} must be a positive integer, got {count!r}")
    references = split.good(split.pool)
    support = _draw_pairs(split, split.pool, n_support, balanced, rng)
    query = _draw_pairs(split, split.holdout, n_query, balanced, rng)
    return Episode(pairs_for(split.images, support, references, reference, rng),
                   pairs_for(split.images, query, references, reference, rng))


@dataclass(frozen=True, eq=False)
class TargetSplit:
    """A left-out task's sets: ``fit`` (fine-tuned on), ``validation`` (early stopping), ``test`` (the 30%).

    References for all three come from the good images of ``fit``: the only images the adaptation is
    taken to have known to be good (with ``shots``, the few shots' good images).
    """

    split: TaskSplit
    fit: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    @property
    def references(self) -> np.ndarray:
        return self.split.good(self.fit)

    def train_pairs(self, rng: np.random.Generator,
                    reference: ReferenceRule = DEFAULT_REFERENCE) -> tuple[PairBatch, PairBatch]:
        """(fit pairs, validation pairs), one pair per image, in index order."""
        images = self.split.images
        return (pairs_for(images, self.fit, self.references, reference, rng),
                pairs_for(images, self.validation, self.references, reference, rng))

    def test_pairs(self, rng: np.random.Generator, reference: ReferenceRule = DEFAULT_REFERENCE) -> PairBatch:
        """One pair per test image (the 30% share), in index order."""
        return pairs_for(self.split.images, self.test, self.references, reference, rng)


def _allocate_shots(n_good: int, n_defective: int, shots: int) -> tuple[int, int]:
    """Good and defective counts of ``shots`` in proportion to the pool, with at least 2 good and 1 defective."""
    good = min(max(_round(shots * n_good / (n_good + n_defective)), 2), n_good, shots - 1)
    defective = min(shots - good, n_defective)
    return shots - defective, defective


def target_split(split: TaskSplit, rng: np.random.Generator, shots: int | None = None,
                 validation_fraction: float = 0.2) -> TargetSplit:
    """The left-out task's fit/validation/test sets: all of the 70% share, or ``shots`` images of it.

    Shots are drawn stratified (in the share's class proportions, at least 2 good and 1 defective);
    ``validation_fraction`` of each class goes to validation, rounded, keeping at least 2 good and 1
    defective image to fit on, and at least one of a class in validation when that rule leaves one spare.
    """
    _check_rng(rng)
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    good, defective = split.good(split.pool), split.defective(split.pool)
    if shots is not None:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 3:
            raise ValueError(f"shots must be an integer >= 3 (2 good and 1 defective at least), got {shots!r}")
        if shots > len(split.pool):
            raise ValueError(f"shots={shots} but task {split.name!r}'s training share holds {len(split.pool)} images")
        n_good, n_defective = _allocate_shots(len(good), len(defective), shots)
        good = np.sort(rng.choice(good, n_good, replace=False))
        defective = np.sort(rng.choice(defective, n_defective, replace=False))
    fit, validation = [], []
    for members, minimum in ((good, 2), (defective, 1)):
        spare = len(members) - minimum
        k = min(_round(validation_fraction * len(members)), spare)
        if validation_fraction > 0 and spare > 0:
            k = max(k, 1)
        order = rng.permutation(members)
        validation.append(order[:k])
        fit.append(order[k:])
    return TargetSplit(split, np.sort(np.concatenate(fit)), np.sort(np.concatenate(validation)), split.holdout.copy())
