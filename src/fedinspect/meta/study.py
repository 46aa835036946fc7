"""Seed 002's experiments as one resumable study: leave one product task out, meta-train on the others, adapt.

For every task (the *target*) and every variant of the chosen experiments, one *cell*:

1. meta-trains a :class:`~fedinspect.meta.model.MeDetectionNet` with MAML on every other task (a variant without
   meta-training starts from its initial weights instead), never drawing an image of the target;
2. fine-tunes it on the target's 70% share (all of it, or ``shots`` images), early stopping on a validation share;
3. tests it on the target's 30% share: accuracy, recall, precision and F1 at probability 0.5 and AUROC
   (scikit-learn), epochs to converge, and Grad-CAM maps of the first few defective test images.

Experiments and their variants (the seed's tables):

- ``init`` (Tables 2 and 3): ``maml`` (meta-weights), ``random`` (the same initial weights, no meta-training) and
  ``imagenet``. The 4-conv backbone has no ImageNet weights, so ``imagenet`` is the same design on the frozen
  ImageNet-pretrained EfficientNet-Lite0 stem (``backbone="efficientnet_lite0"``), its trainable blocks and head
  randomly initialised and not meta-trained.
- ``placement`` (Table 4): coordinate attention ``low`` (= ``maml``), ``ca-high``, ``ca-both``, ``ca-none``.
- ``ablation`` (Table 5): ``maml`` (Ours), ``no-sn`` (Ours-SN), ``ca-none`` (Ours-CA), ``no-sn-ca`` (Ours-CA-SN).

Every variant with MAML shares one model seed, so ``maml`` and ``random`` start from the same weights. Files::

    OUT/cells/<task>/meta-<model>.safetensors   meta-weights of one model trained without <task> (+ .json)
    OUT/cells/<task>/<variant>@<shots>.json     one finished cell (settings, meta-training tasks, metrics)
    OUT/cells/<task>/<variant>@<shots>.npz      its Grad-CAM maps
    OUT/results.json, OUT/report.md, OUT/report.html, OUT/gradcam/*.png

A rerun skips every finished cell and reuses finished meta-weights; an OUT whose cells were made with other
settings (or another task list) is refused before any work, naming the file and the settings that differ.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.meta.gradcam import grad_cam
from fedinspect.meta.maml import fine_tune, meta_train
from fedinspect.meta.model import ATTENTIONS, BACKBONES, MeDetectionNet
from fedinspect.meta.pairs import PairBatch
from fedinspect.meta.tasks import (
    REFERENCE_RULES,
    TaskImages,
    TaskSplit,
    leave_one_out,
    load_tasks,
    sample_episode,
    split_task,
    target_split,
    task_rng,
    tasks_from_dirs,
)

CELLS_DIR = "cells"
RESULTS_FILE = "results.json"
CELL_FORMAT = "fedinspect-meta-cell/1"
META_FORMAT = "fedinspect-meta-weights/1"
EXPERIMENTS = ("init", "placement", "ablation")
IMAGENET_BACKBONE = "efficientnet_lite0"
EVAL_BATCH = 256


@dataclass(frozen=True)
class Variant:
    """One model of the study: where coordinate attention goes, Siamese or not, meta-trained or not."""

    name: str
    label: str
    attention: str
    siamese: bool
    meta: bool
    imagenet: bool = False  # the frozen pretrained Lite0 stem instead of the study's backbone

    def backbone(self, settings: MetaStudySettings) -> str:
        return IMAGENET_BACKBONE if self.imagenet else settings.backbone

    def model_key(self, settings: MetaStudySettings) -> str:
        """Names the meta-weights file: variants of one architecture share their meta-training."""
        return f"{self.backbone(settings)}-ca_{self.attention}-{'sn' if self.siamese else 'nosn'}"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("maml", "MAML", "low", True, True),
    Variant("random", "Random", "low", True, False),
    Variant("imagenet", "ImageNet (Lite0)", "low", True, False, imagenet=True),
    Variant("ca-high", "CA high", "high", True, True),
    Variant("ca-both", "CA both", "both", True, True),
    Variant("ca-none", "CA none", "none", True, True),
    Variant("no-sn", "no Siamese", "low", False, True),
    Variant("no-sn-ca", "no Siamese, no CA", "none", False, True),
)}
EXPERIMENT_VARIANTS: dict[str, tuple[str, ...]] = {
    "init": ("maml", "random", "imagenet"),
    "placement": ("maml", "ca-high", "ca-both", "ca-none"),
    "ablation": ("maml", "no-sn", "ca-none", "no-sn-ca"),
}


def shots_label(shots: int | None) -> str:
    """``all`` or ``<n>shot``: the part of a cell's file name that says how many target images it fine-tuned on."""
    return "all" if shots is None else f"{shots}shot"


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"meta-study: {name} must be an integer >= {minimum}, got {value!r}")


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"meta-study: {name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                            f"got {value!r}")


@dataclass(frozen=True)
class MetaStudySettings:
    """Every setting of a meta-study. The defaults fit a 2-core CPU (the seed: 256 px, 1,000 epochs, a GPU).

    Meta-training (MAML, :func:`~fedinspect.meta.maml.meta_train`): ``meta_steps`` Adam steps on ``meta_batch``
    tasks drawn per step (each ``n_support`` support and ``n_query`` query pairs), ``inner_steps`` SGD steps at
    ``inner_lr``, outer lr ``outer_lr``, first order unless ``first_order`` is False, early stopping after
    ``meta_patience`` steps without a lower query loss (None: never). Fine-tuning
    (:func:`~fedinspect.meta.maml.fine_tune`): at most ``epochs`` epochs at ``lr``, stopping after ``patience``
    epochs without a lower validation loss. ``experiments`` and ``shots`` choose the cells; every other field is
    part of each cell's record, and a study folder refuses to resume with different values.
    """

    experiments: tuple[str, ...] = EXPERIMENTS
    shots: tuple[int | None, ...] = (None,)  # None: all of the target's training share
    image_size: int = 64
    backbone: str = "conv4"
    width: int = 32
    reference: str = "nearest"
    meta_steps: int = 60
    meta_batch: int = 4
    n_support: int = 64
    n_query: int = 20
    inner_steps: int = 1
    inner_lr: float = 1e-5
    outer_lr: float = 1e-3
    first_order: bool = True
    meta_patience: int | None = 20
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 64
    patience: int | None = 8
    validation_fraction: float = 0.2
    gradcam_images: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        experiments = tuple(dict.fromkeys(self.experiments))
        unknown = [e for e in experiments if e not in EXPERIMENTS]
        if unknown or not experiments:
            raise SettingsError(f"meta-study: unknown experiment(s) {', '.join(unknown) or '(none given)'}; choose "
                                f"from {', '.join(EXPERIMENTS)}")
        object.__setattr__(self, "experiments", experiments)
        shots = tuple(dict.fromkeys(self.shots))
        if not shots:
            raise SettingsError("meta-study: shots: give 'all' or a number of images, at least one")
        for value in shots:
            if value is not None:
                _positive_int("shots", value, minimum=3)
        object.__setattr__(self, "shots", shots)
        _positive_int("image_size", self.image_size, minimum=32)
        if self.backbone not in BACKBONES:
            raise SettingsError(f"meta-study: backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.reference not in REFERENCE_RULES:
            raise SettingsError(f"meta-study: reference must be one of {', '.join(REFERENCE_RULES)}, "
                                f"got {self.reference!r}")
        for name in ("width", "meta_steps", "meta_batch", "n_support", "n_query", "epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("inner_steps", "gradcam_images", "seed"):
            _positive_int(name, getattr(self, name), minimum=0)
        for name in ("meta_patience", "patience"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_float("inner_lr", self.inner_lr, allow_zero=True)
        _positive_float("outer_lr", self.outer_lr)
        _positive_float("lr", self.lr)
        if not 0 <= self.validation_fraction < 1:
            raise SettingsError(f"meta-study: validation_fraction must lie in [0, 1), got {self.validation_fraction!r}")
        if not isinstance(self.first_order, bool):
            raise SettingsError(f"meta-study: first_order must be true or false, got {self.first_order!r}")

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants the chosen experiments need, each once, in the order of :data:`VARIANTS`."""
        wanted = {name for experiment in self.experiments for name in EXPERIMENT_VARIANTS[experiment]}
        return tuple(name for name in VARIANTS if name in wanted)

    def record(self) -> dict[str, Any]:
        """The settings a finished cell depends on (all but ``experiments`` and ``shots``), as JSON values."""
        values = asdict(self)
        del values["experiments"], values["shots"]
        return json.loads(json.dumps(values))


def task_slug(name: str) -> str:
    """A task's folder name under ``cells/``: its name with every character but letters, digits, ``._-`` as _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically: an interrupted write never leaves a half file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedinspectError(f"{path}: not a readable meta-study record ({error}); delete it to redo that cell") \
            from error
    if not isinstance(value, dict):
        raise FedinspectError(f"{path}: not a meta-study record (a JSON object); delete it to redo that cell")
    return value


def check_resume(out: Path, settings: MetaStudySettings, task_names: Sequence[str]) -> None:
    """Refuse ``out`` when a record in it was made with other settings or another task list (nothing is mixed)."""
    cells = out / CELLS_DIR
    if not cells.is_dir():
        return
    expected = settings.record()
    for path in sorted(cells.glob("*/*.json")):
        record = _read_json(path)
        if record.get("format") not in (CELL_FORMAT, META_FORMAT):
            raise FedinspectError(f"{path}: not a meta-study record; {out} must hold only a meta-study's files")
        previous = record.get("settings", {})
        differ = sorted(key for key in expected.keys() | previous.keys() if previous.get(key) != expected.get(key))
        if differ:
            changes = ", ".join(f"{key} {previous.get(key)!r} -> {expected.get(key)!r}" for key in differ)
            raise SettingsError(f"{path}: this study folder was run with other settings ({changes}); rerun with the "
                                f"same settings to resume, or choose another --out")
        if record.get("tasks") != list(task_names):
            raise SettingsError(f"{path}: this study folder was run on the tasks {record.get('tasks')}, not "
                                f"{list(task_names)}; leave-one-out results depend on every task: choose another "
                                "--out")


# --------------------------------------------------------------------------------------------------
# One cell


def _new_model(variant: Variant, settings: MetaStudySettings) -> MeDetectionNet:
    """The variant's network with the study's model seed: every variant of one shape starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return MeDetectionNet(attention=variant.attention, siamese=variant.siamese,
                              backbone=variant.backbone(settings), width=settings.width)


class _Sampler:
    """Draws a meta-batch of episodes from the meta-training tasks and records which tasks it drew."""

    def __init__(self, splits: Sequence[TaskSplit], settings: MetaStudySettings) -> None:
        self.splits = list(splits)
        self.settings = settings
        self.drawn: set[str] = set()

    def __call__(self, rng: np.random.Generator) -> list[tuple[PairBatch, PairBatch]]:
        count = min(self.settings.meta_batch, len(self.splits))
        chosen = rng.choice(len(self.splits), size=count, replace=False)
        episodes = []
        for index in sorted(int(i) for i in chosen):
            split = self.splits[index]
            self.drawn.add(split.name)
            episodes.append(tuple(sample_episode(split, rng, self.settings.n_support, self.settings.n_query,
                                                 self.settings.reference)))
        return episodes


def _meta_weights(out: Path, target: str, variant: Variant, settings: MetaStudySettings, task_names: list[str],
                  splits: dict[str, TaskSplit], tasks: list[Any], progress: bool) -> tuple[MeDetectionNet, dict]:
    """The variant's meta-weights trained without ``target``: read back when finished, else trained and written."""
    from safetensors.torch import load_file, save_file

    key = variant.model_key(settings)
    folder = out / CELLS_DIR / task_slug(target)
    weights_file, record_file = folder / f"meta-{key}.safetensors", folder / f"meta-{key}.json"
    model = _new_model(variant, settings)
    if weights_file.is_file() and record_file.is_file():
        record = _read_json(record_file)
        model.load_state_dict(load_file(weights_file))
        return model, record
    meta_tasks, _ = leave_one_out(tasks, target)
    if not meta_tasks:
        raise FedinspectError(f"meta-study: no task left to meta-train on without {target!r}; give two tasks or more")
    sampler = _Sampler([splits[task.name] for task in meta_tasks], settings)
    start = time.perf_counter()
    result = meta_train(model, sampler, meta_steps=settings.meta_steps, inner_steps=settings.inner_steps,
                        inner_lr=settings.inner_lr, outer_lr=settings.outer_lr, first_order=settings.first_order,
                        patience=settings.meta_patience, seed=settings.seed, progress=progress)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    partial = weights_file.with_name(weights_file.name + ".partial")
    save_file({name: tensor.contiguous() for name, tensor in result.state.items()}, str(partial))
    os.replace(partial, weights_file)
    record = {"format": META_FORMAT, "target": target, "model": key, "settings": settings.record(),
              "tasks": task_names, "meta_tasks": [task.name for task in meta_tasks],
              "meta_tasks_drawn": sorted(sampler.drawn), "seconds": seconds, "steps_run": len(result.history),
              "best_step": result.best_step, "stopped_early": result.stopped_early, "query_loss": result.history}
    _write_json(record_file, record)
    return model, record


def _scores(model: MeDetectionNet, pairs: PairBatch) -> np.ndarray:
    """Probabilities of "defective" for every pair, in order."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), EVAL_BATCH):
            logits = model(pairs.reference[start:start + EVAL_BATCH], pairs.test[start:start + EVAL_BATCH])
            out.append(torch.sigmoid(logits).double().numpy())
    return np.concatenate(out)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, recall, precision and F1 of "defective" at ``threshold``, and AUROC (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    predicted = (probabilities >= threshold).astype(int)
    return {"accuracy": float(accuracy_score(labels, predicted)),
            "recall": float(recall_score(labels, predicted, zero_division=0)),
            "precision": float(precision_score(labels, predicted, zero_division=0)),
            "f1": float(f1_score(labels, predicted, zero_division=0)),
            "auroc": float(roc_auc_score(labels, probabilities))}


def run_cell(out: Path, target: str, variant: Variant, shots: int | None, settings: MetaStudySettings,
             tasks: list[Any], splits: dict[str, TaskSplit], progress: bool) -> dict[str, Any]:
    """Meta-train (or reuse), fine-tune and test one variant on one left-out task; write and return its record."""
    task_names = [task.name for task in tasks]
    if variant.meta:
        model, meta = _meta_weights(out, target, variant, settings, task_names, splits, tasks, progress)
    else:
        model, meta = _new_model(variant, settings), None
    split = splits[target]
    sets = target_split(split, task_rng(settings.seed, target, f"target-{shots_label(shots)}"), shots,
                        settings.validation_fraction)
    fit, validation = sets.train_pairs(task_rng(settings.seed, target, "references"), settings.reference)
    test = sets.test_pairs(task_rng(settings.seed, target, "references"), settings.reference)
    start = time.perf_counter()
    tuned = fine_tune(model, fit, validation if len(sets.validation) else None, lr=settings.lr,
                      epochs=settings.epochs, batch_size=settings.batch_size, patience=settings.patience,
                      seed=settings.seed, progress=progress)
    fine_tune_s = time.perf_counter() - start
    labels = split.images.labels[sets.test]
    metrics = classification_metrics(labels, _scores(model, test))

    stem = f"{variant.name}@{shots_label(shots)}"
    folder = out / CELLS_DIR / task_slug(target)
    folder.mkdir(parents=True, exist_ok=True)
    positions = np.flatnonzero(labels == 1)[:settings.gradcam_images]
    cam_file = None
    if len(positions):
        index = torch.from_numpy(positions)
        cams = grad_cam(model, test.reference[index], test.test[index])
        probabilities = _scores(model, PairBatch(test.reference[index], test.test[index], test.label[index]))
        cam_file = folder / f"{stem}.npz"
        partial = folder / f"{stem}.partial.npz"
        np.savez_compressed(partial, cams=cams.numpy().astype(np.float16), image_index=sets.test[positions],
                            probability=probabilities)
        os.replace(partial, cam_file)
    record = {
        "format": CELL_FORMAT, "task": target, "variant": variant.name, "shots": shots, "settings": settings.record(),
        "tasks": task_names, "model": variant.model_key(settings), "meta_trained": variant.meta,
        "meta_tasks": meta["meta_tasks"] if meta else [], "meta_tasks_drawn": meta["meta_tasks_drawn"] if meta else [],
        "meta_train_s": meta["seconds"] if meta else None, "meta_steps_run": meta["steps_run"] if meta else None,
        "meta_best_step": meta["best_step"] if meta else None,
        "fit_images": len(sets.fit), "validation_images": len(sets.validation), "test_images": len(sets.test),
        "task_images": len(split.images), "metrics": metrics, "epochs_to_converge": tuned.epochs_to_converge,
        "epochs_run": len(tuned.train_loss), "stopped_early": tuned.stopped_early, "fine_tune_s": fine_tune_s,
        "train_loss": tuned.train_loss, "validation_loss": tuned.validation_loss,
        "gradcam": None if cam_file is None else cam_file.name,
    }
    _write_json(folder / f"{stem}.json", record)
    return record


# --------------------------------------------------------------------------------------------------
# The study


def cell_file(out: Path, target: str, variant: str, shots: int | None) -> Path:
    return out / CELLS_DIR / task_slug(target) / f"{variant}@{shots_label(shots)}.json"


def run_meta_study(data_dirs: Sequence[str | Path], out: str | Path, settings: MetaStudySettings | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every cell of the study on the tasks in ``data_dirs``; write the tables; return the summary.

    ``data_dirs``: category folders (MVTec or AutoVI layout), folders of labelled images, dataset folders holding
    them, or ``.toml`` task lists (:func:`~fedinspect.meta.tasks.tasks_from_dirs`). Every task is left out once.
    """
    from tqdm.auto import tqdm

    from fedinspect.meta.study_report import summarize, write_meta_report

    settings = settings or MetaStudySettings()
    out = Path(out)
    tasks = tasks_from_dirs(data_dirs)
    if len(tasks) < 2:
        raise FedinspectError(f"meta-study: found {len(tasks)} task ({', '.join(t.name for t in tasks)}); leaving "
                              "one out needs two tasks or more")
    slugs = [task_slug(task.name) for task in tasks]
    if len(set(slugs)) != len(slugs):
        raise FedinspectError(f"meta-study: task names {', '.join(t.name for t in tasks)} give the same folder name "
                              "under cells/; rename one (a task list file can name it)")
    task_names = [task.name for task in tasks]
    check_resume(out, settings, task_names)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images: dict[str, TaskImages] = load_tasks(tasks, settings.image_size)
    splits = {name: split_task(task_images, settings.seed) for name, task_images in images.items()}
    for shots in settings.shots:  # refuse an impossible --shots before hours of work
        for name, split in splits.items():
            if shots is not None and shots > len(split.pool):
                raise SettingsError(f"meta-study: --shots {shots} but task {name!r} has {len(split.pool)} training "
                                    "images (70% of its images)")
    jobs = [(task.name, VARIANTS[name], shots) for task in tasks for name in settings.variants
            for shots in settings.shots]
    ran = 0
    bar = tqdm(jobs, desc="meta-study", unit="cell", disable=not progress)
    for target, variant, shots in bar:
        bar.set_postfix(task=target, variant=variant.name, shots=shots_label(shots))
        if cell_file(out, target, variant.name, shots).is_file():
            continue
        run_cell(out, target, variant, shots, settings, tasks, splits, progress)
        ran += 1
    bar.close()
    cells = [_read_json(cell_file(out, target, variant.name, shots)) for target, variant, shots in jobs]
    summary = summarize(cells, settings, tasks, images)
    summary["cells_run"] = ran
    summary["cells_reused"] = len(jobs) - ran
    summary["wall_s"] = time.perf_counter() - started
    write_meta_report(out, summary, images)
    _write_json(out / RESULTS_FILE, summary)
    return summary


__all__ = ["ATTENTIONS", "EXPERIMENTS", "EXPERIMENT_VARIANTS", "VARIANTS", "MetaStudySettings", "Variant",
           "classification_metrics", "run_cell", "run_meta_study"]
