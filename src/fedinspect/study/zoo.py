"""Seed 004's centralized study of the detector zoo: every detector, trained and tested within and across datasets.

For every detector and every training set - each dataset alone, then (with two datasets or more) their
union - one *cell* fits the detector on the fit and validation shares of the training images (the T1
share is held out, :func:`~fedinspect.evaluation.thresholds.train_shares`) and tests it:

1. on the same dataset (the seed's Tables 5-8), T1 from its T1 share, T2 and T3 from its select share;
2. on every other dataset with the thresholds of the training dataset (Tables 10-13);
3. the union model on each dataset, thresholds chosen on that dataset's own shares (Tables 14-17).

Each cell runs in a fresh process (so its peak memory is its own) and writes::

    cells/<detector>/train-<name>/model/            the fitted model (written all at once)
    cells/<detector>/train-<name>/fit.json          fit time, images, peak memory, size, parameters
    cells/<detector>/train-<name>/test-<name>/      results.json (and thresholds.png within a dataset)

With ``synthetic_validation`` (an offline defect generator), T2 and T3 of (1) and (3) are chosen on synthetic
defects drawn into the T1 share instead of the select share, the real-chosen ones kept beside them
(:func:`fedinspect.pipeline.evaluate_category`), and (2) carries those over.

A rerun keeps every finished model and result and does only what is missing (a test whose thresholds were
chosen with another ``synthetic_validation`` is redone, its model kept), so an interrupted study resumes; a
cell that fails is recorded (``error.txt``) and the study goes on. ``zoo_study.json`` and the report
(``report.md``/``report.html``: the seed's localization and detection tables, AUC-sPRO beside them, the cost
table and the threshold figures) are written from whatever is finished.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedinspect.errors import FedinspectError, SettingsError

CELLS_DIR = "cells"
STUDY_FILE = "zoo_study.json"
FIT_FILE = "fit.json"
ERROR_FILE = "error.txt"
UNION = "union"


@dataclass(frozen=True)
class ZooSettings:
    """What every cell shares: detectors, image size, split seed, T1 percentile, training overrides."""

    detectors: tuple[str, ...]
    image_size: int = 256
    seed: int = 0
    percentile: float = 99.0
    epochs: int | None = None  # None: each trained detector's own default
    isolate: bool = True  # each cell in a fresh process (its own peak memory); False: in this process
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # detector -> extra constructor parameters
    synthetic_validation: str | None = None  # an offline generator: T2/T3 chosen on its defects (ThresholdOptions)

    def __post_init__(self) -> None:
        from fedinspect.detectors.model_files import check_image_size

        check_image_size(self.image_size)
        if self.synthetic_validation is not None:
            from fedinspect.evaluation.synthetic_thresholds import check_synthetic_method

            try:
                check_synthetic_method(self.synthetic_validation)
            except ValueError as error:
                raise SettingsError(str(error)) from None
        if not 0 < self.percentile <= 100:
            raise SettingsError(f"T1 percentile must lie in (0, 100], got {self.percentile!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 1):
            raise SettingsError(f"epochs must be a positive integer, got {self.epochs!r}")

    def detector_params(self, detector: str) -> dict[str, Any]:
        """Constructor parameters of ``detector`` in this study."""
        from fedinspect.detectors.registry import detector_parameters

        params: dict[str, Any] = {"image_size": self.image_size, "seed": self.seed}
        if self.epochs is not None and "epochs" in detector_parameters(detector):
            params["epochs"] = self.epochs
        if detector_parameters(detector).get("validation_fraction"):  # DRAEM keeps none (its default is 0)
            params["validation_fraction"] = 15 / 85  # the seed's 70/15 of the 85% not held out for T1
        params.update(self.params.get(detector, {}))
        return params


def _name(path: Path) -> str:
    """A dataset's label in the study: its folder name (two datasets of one name are refused)."""
    return path.name


def training_sets(data_dirs: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """(label, datasets) of every training set: each dataset, then the union of all when there are several."""
    sets = [(_name(path), [path]) for path in data_dirs]
    if len(data_dirs) > 1:
        sets.append((UNION, list(data_dirs)))
    return sets


def _same_validation(results_file: Path, settings: ZooSettings) -> bool:
    """Whether a finished test chose its thresholds as ``settings`` asks (absent key: real defects, as before)."""
    try:
        results = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return results.get("synthetic_validation") == settings.synthetic_validation


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_cell(detector: str, train_label: str, train_dirs: list[Path], test_dirs: list[Path], cell_dir: Path,
             settings: ZooSettings, progress: bool) -> None:
    """Fit (or reuse) one detector on one training set and test it on every dataset; files as described above."""
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.detectors.registry import get_detector, load_detector
    from fedinspect.evaluation.thresholds import train_shares
    from fedinspect.pipeline import (
        ThresholdOptions,
        evaluate_category,
        fit_on_samples,
        model_parameter_count,
        peak_memory_mb,
    )
    from fedinspect.run_folder import staged_output

    model_dir, fit_file = cell_dir / "model", cell_dir / FIT_FILE
    cell_dir.mkdir(parents=True, exist_ok=True)
    if fit_file.is_file() and model_dir.is_dir():
        model = load_detector(model_dir, progress=progress)
    else:
        model = get_detector(detector, progress=progress, **settings.detector_params(detector))
        parts = []
        for path in train_dirs:
            dataset = CategoryDataset(path)
            fit, validation, _ = train_shares(len(dataset.train), settings.seed)
            parts.append((dataset, [dataset.train[i] for i in sorted([*fit, *validation])]))
        with staged_output(model_dir, inputs=train_dirs) as staging:
            fit_on_samples(model, parts).save(staging)
        fit_file.write_text(json.dumps({
            "detector": detector, "train": train_label, "train_images": model.n_train_images_,
            "fit_s": model.fit_seconds_, "peak_memory_mb": peak_memory_mb(),
            "model_bytes": _folder_bytes(model_dir), "parameters": model_parameter_count(model),
            "epochs_run": len(getattr(model, "history_", None) or []) or None,
            "best_epoch": getattr(model, "best_epoch_", None), "params": model.get_params(),
        }, indent=2))

    chosen: dict[str, float] | None = None
    for test_dir in sorted(test_dirs, key=lambda path: path not in train_dirs):  # within the dataset first
        test_label = _name(test_dir)
        out = cell_dir / f"test-{test_label}"
        results_file = out / "results.json"
        same = train_dirs == [test_dir]
        cross = train_label != UNION and not same
        error_file = cell_dir / f"test-{test_label}.{ERROR_FILE}"
        if results_file.is_file() and _same_validation(results_file, settings):
            results = json.loads(results_file.read_text())
        else:
            error_file.unlink(missing_ok=True)
            options: ThresholdOptions | None = ThresholdOptions(
                percentile=settings.percentile, split_seed=settings.seed, t1_held_out=True,
                given=chosen if cross else None, figure_examples=0 if cross else 4,
                synthetic_validation=settings.synthetic_validation)
            if cross and chosen is None:  # the training dataset gave no thresholds: none to carry over
                options = None
            try:
                results = evaluate_category(model, test_dir, out, progress=progress, write_maps=False,
                                            thresholds=options)
            except FedinspectError as error:  # e.g. PaDiM's grid on another dataset: the other tests go on
                error_file.write_text(f"{type(error).__name__}: {error}\n")
                continue
            results["peak_memory_mb"] = peak_memory_mb()
            if settings.synthetic_validation is not None:  # cross tests carry the synthetic thresholds over
                results["synthetic_validation"] = settings.synthetic_validation
            results_file.write_text(json.dumps(results, indent=2))
        block = results.get("thresholds", {})
        if same and "T1" in block:
            chosen = {name: block[name]["value"] for name in ("T1", "T2", "T3")}


def _cell_process(*args: Any) -> None:
    """Entry point of a cell's process: the error, if any, goes to error.txt (the parent reads it)."""
    cell_dir: Path = args[4]
    try:
        run_cell(*args)
    except BaseException as error:  # recorded for the parent, which decides; the process exits anyway
        cell_dir.mkdir(parents=True, exist_ok=True)
        message = str(error) if isinstance(error, FedinspectError) else traceback.format_exc()
        (cell_dir / ERROR_FILE).write_text(f"{type(error).__name__}: {message}\n")
        raise SystemExit(1) from None


def _run_isolated(args: tuple[Any, ...]) -> int:
    process = multiprocessing.get_context("spawn").Process(target=_cell_process, args=args)
    process.start()
    process.join()  # wait for it: no race with the next cell
    return process.exitcode


def run_zoo_study(data_dirs: Sequence[str | Path], out_dir: str | Path, settings: ZooSettings,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every cell, then write ``zoo_study.json`` and the report; returns the summary."""
    from fedinspect.study.zoo_report import summarize, write_zoo_report

    data = [Path(path) for path in data_dirs]
    names = [_name(path) for path in data]
    if len(set(names)) != len(names):
        raise FedinspectError(f"zoo-study: two datasets share a folder name ({', '.join(names)}): results are filed "
                              "by name; give each a distinct name")
    for path in data:
        if not path.is_dir():
            raise FedinspectError(f"{path}: no such dataset folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed: list[dict[str, str]] = []
    jobs = [(detector, label, dirs) for detector in settings.detectors for label, dirs in training_sets(data)]
    for index, (detector, label, dirs) in enumerate(jobs, start=1):
        cell_dir = out / CELLS_DIR / detector / f"train-{label}"
        expected = [cell_dir / f"test-{_name(path)}" / "results.json" for path in data]
        if all(path.is_file() and _same_validation(path, settings) for path in expected) \
                and (cell_dir / FIT_FILE).is_file():
            status = "done before"  # a test that failed before has no results.json: the cell runs again
        else:
            (cell_dir / ERROR_FILE).unlink(missing_ok=True)
            start = time.perf_counter()
            args = (detector, label, dirs, data, cell_dir, settings, progress)
            if settings.isolate:
                code = _run_isolated(args)
            else:
                try:
                    run_cell(*args)
                    code = 0
                except FedinspectError as error:
                    cell_dir.mkdir(parents=True, exist_ok=True)
                    (cell_dir / ERROR_FILE).write_text(f"{type(error).__name__}: {error}\n")
                    code = 1
            status = f"ran in {time.perf_counter() - start:.0f} s" if code == 0 else "failed"
            if code != 0:
                error_file = cell_dir / ERROR_FILE
                reason = error_file.read_text().strip() if error_file.is_file() else f"process exit code {code}"
                failed.append({"detector": detector, "train": label, "test": None, "error": reason})
                print(f"warning: zoo-study {detector} trained on {label} failed: {reason.splitlines()[-1]}",
                      file=sys.stderr)
            for path in data:
                error_file = cell_dir / f"test-{_name(path)}.{ERROR_FILE}"
                if error_file.is_file():
                    reason = error_file.read_text().strip()
                    failed.append({"detector": detector, "train": label, "test": _name(path), "error": reason})
                    print(f"warning: zoo-study {detector} trained on {label}, tested on {_name(path)} failed: "
                          f"{reason.splitlines()[-1]}", file=sys.stderr)
        if progress:
            print(f"[{index}/{len(jobs)}] {detector} trained on {label}: {status}", file=sys.stderr)

    summary = summarize(out, settings, names, failed)
    summary["settings"] = asdict(settings)
    summary["wall_s"] = time.perf_counter() - started
    (out / STUDY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    write_zoo_report(out, summary)
    return summary
