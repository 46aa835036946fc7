"""Seed 003's experiment (DIAG, Tables 1-2) on one category: a supervised detector trained on synthetic defects.

For each synthesis method and each count N_aug of synthetic defects:

- **zero-shot** (Table 1): the supervised detector trains on the good training images and N_aug synthetic
  defective images, no real defect;
- **full-shot** (Table 2): the same plus the real defective training images;

and two references: the **no-synthesis baseline** (full-shot with the real defects only) and **PatchCore**
fitted on the good training images (the unsupervised detector a user without defects would otherwise use).
Every cell is scored on the same test split by average precision, precision, recall, F1 and image AUROC.

Data split. An MVTec-layout category (``train/good``, ``test/<defect>``) has no defective training image,
so its real defective test images are split, per defect type with a seeded permutation: a share
``real_fraction`` (half) is the real positives of full-shot training, the rest and every ``test/good``
image (good images never used in training) are the test split. A KolektorSDD2-layout folder keeps its own
``train``/``test`` split, as the seed does.

Synthesis: the N_aug defects are drawn by :mod:`fedinspect.synthesis` into a seeded permutation of the
good training images exactly as ``fedinspect synthesize --seed S`` draws them (image ``i`` of a method from
``default_rng([seed, method number, i])``); the first 80 of 120 are the 80-image set, so counts are nested.
The good source images stay in the training set as negatives (the seed trains on I_n and I_a).

Output (resumable: a finished cell is a JSON file and is not run again; a rerun with other settings is refused)::

    OUT/settings.json            the settings and the data folder
    OUT/cells/<cell>.json        metrics, training history, counts, times of one cell
    OUT/cams/<cell>.png          class-activation maps of a few test images (supervised cells)
    OUT/results.json             split, every cell, Tables 1 and 2, synthesis times
    OUT/report.md, report.html   the tables in the seed's layout (the shared document renderer)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedinspect.errors import FedinspectError, SettingsError

CELLS_DIR = "cells"
CAMS_DIR = "cams"
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.json"
DEFAULT_METHODS = ("perlin", "cutpaste", "cutpaste_scar", "memseg")
ZERO_SHOT, FULL_SHOT, BASELINE, PATCHCORE = "zero-shot", "full-shot", "baseline", "patchcore"
METRICS = ("ap", "precision", "recall", "f1", "auroc")


@dataclass(frozen=True)
class SynthesisStudySettings:
    """What defines a study's results (a rerun into the same OUT must use the same ones).

    ``image_size`` .. ``patience``, ``backbone``, ``weights``: the :class:`~fedinspect.supervised.
    SupervisedDetector`'s; ``real_fraction``: share of an MVTec category's real defects used for full-shot
    training; ``masks``: where defects may appear (``generated``, ``real``: the real training defects' masks,
    as the seed, or a folder of drawn masks); ``patchcore_percentile``: PatchCore's decision threshold, a
    percentile of the scores of good training images held out of its memory bank.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    counts: tuple[int, ...] = (80, 100, 120)
    seed: int = 0
    epochs: int = 30
    image_size: int = 224
    batch_size: int = 32
    lr: float = 1e-4
    patience: int = 5
    validation_fraction: float = 0.2
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    real_fraction: float = 0.5
    masks: str = "generated"
    texture_dir: str | None = None
    inpaint_model: str | None = None
    prompts: str | None = None
    patchcore: bool = True
    patchcore_percentile: float = 99.0
    cam_examples: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # further SupervisedDetector parameters

    def __post_init__(self) -> None:
        from fedinspect.synthesis.generators import METHODS

        if not self.methods:
            raise SettingsError("synthesis-study: no method given")
        for method in self.methods:
            if method not in METHODS:
                raise SettingsError(f"synthesis-study: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if not self.counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.counts):
            raise SettingsError(f"synthesis-study: counts must be positive integers, got {self.counts!r}")
        if not 0 < self.real_fraction < 1:
            raise SettingsError(f"synthesis-study: real_fraction must be in (0, 1), got {self.real_fraction!r}")
        if not 0 < self.patchcore_percentile <= 100:
            raise SettingsError(f"synthesis-study: patchcore_percentile must be in (0, 100], got "
                                f"{self.patchcore_percentile!r}")
        if "diffusion" in self.methods and not self.inpaint_model:
            raise SettingsError("synthesis-study: the diffusion method needs a local inpainting checkpoint "
                                "(--inpaint-model DIR); see `fedinspect synthesize --help`")

    def detector_params(self) -> dict[str, Any]:
        """Constructor parameters of the study's :class:`~fedinspect.supervised.SupervisedDetector`."""
        return {"backbone": self.backbone, "weights": self.weights, "image_size": self.image_size,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "validation_fraction": self.validation_fraction, "patience": self.patience, "seed": self.seed,
                **self.extra}

    def cells(self) -> list[tuple[str, str, str | None, int]]:
        """(cell name, setting, method, N_aug) of every cell, in the order they run."""
        cells = [(f"{ZERO_SHOT}_{m}_{n}", ZERO_SHOT, m, n) for m in self.methods for n in self.counts]
        cells.append((BASELINE, BASELINE, None, 0))
        cells += [(f"{FULL_SHOT}_{m}_{n}", FULL_SHOT, m, n) for m in self.methods for n in self.counts]
        if self.patchcore:
            cells.append((PATCHCORE, PATCHCORE, None, 0))
        return cells


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """The study's split: good and real defective training images, and the test images (all labelled)."""

    name: str
    layout: str
    train_good: list[Any]
    train_defective: list[Any]
    test: list[Any]
    defect_of: dict[Path, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"train_good": len(self.train_good), "train_defective": len(self.train_defective),
                "test_good": sum(1 for s in self.test if not s.label),
                "test_defective": sum(1 for s in self.test if s.label)}


def load_study_data(data_dir: str | Path, seed: int, real_fraction: float) -> StudyData:
    """The split of the module docstring, for an MVTec/AutoVI-layout category or a KolektorSDD2 folder."""
    import numpy as np

    from fedinspect.data.kolektor import LabelledImage, is_kolektor_layout, read_kolektor

    root = Path(data_dir)
    if is_kolektor_layout(root):
        splits = read_kolektor(root)
        train = splits["train"]
        data = StudyData(root.name, "ksdd2", [s for s in train if not s.label], [s for s in train if s.label],
                         splits["test"])
    else:
        from fedinspect.data.dataset import CategoryDataset

        dataset = CategoryDataset(root)
        train_good = [LabelledImage(s.image_path, 0) for s in dataset.train]
        test = [LabelledImage(s.image_path, 0) for s in dataset.test if not s.label]
        defective: list[Any] = []
        defect_of: dict[Path, str] = {}
        rng = np.random.default_rng([seed, 3])
        for defect in dataset.defect_types:
            samples = [s for s in dataset.test if s.defect == defect]
            order = rng.permutation(len(samples))
            n_train = round(real_fraction * len(samples))
            for rank, index in enumerate(order):
                sample = samples[int(index)]
                mask = sample.ground_truth[0] if len(sample.ground_truth) == 1 else None
                item = LabelledImage(sample.image_path, 1, mask)
                defect_of[sample.image_path] = defect
                (defective if rank < n_train else test).append(item)
        data = StudyData(dataset.name, dataset.layout, train_good, defective, test, defect_of)
    if not data.train_good:
        raise FedinspectError(f"{root}: no good training image")
    if not any(s.label for s in data.test) or all(s.label for s in data.test):
        raise FedinspectError(f"{root}: the test split needs good and defective images, got {data.counts()}")
    return data


# ----------------------------------------------------------------------------------------------------------
# synthesis
# ----------------------------------------------------------------------------------------------------------


def synthesize_defects(images: list[Any], method: str, count: int, settings: SynthesisStudySettings,
                       masks: list[Path], progress: bool) -> tuple[list[Any], float]:
    """``count`` defective images drawn into a seeded permutation of ``images`` (as ``fedinspect synthesize``)."""
    import numpy as np
    from tqdm.auto import tqdm

    from fedinspect.synthesis.commands import RegionSource, build_generators
    from fedinspect.synthesis.generators import METHODS

    (generator,) = build_generators((method,), settings.texture_dir, settings.inpaint_model,
                                    settings.prompts).values()
    regions = RegionSource("generated", None)
    regions.spec, regions.paths = settings.masks, list(masks)
    order = np.random.default_rng([settings.seed]).permutation(len(images))
    start = time.perf_counter()
    out = []
    for index in tqdm(range(count), desc=f"synthesize {method}", unit="img", disable=not progress, leave=False):
        image = images[int(order[index % len(images)])]
        rng = np.random.default_rng([settings.seed, METHODS.index(method), index])
        region, _ = regions.draw(image.shape[:2], rng)
        result, _ = generator.generate(image, rng, region)
        out.append(result)
    return out, time.perf_counter() - start


def _region_masks(settings: SynthesisStudySettings, data: StudyData) -> list[Path]:
    from fedinspect.data.images import list_images

    if settings.masks == "generated":
        return []
    if settings.masks == "real":
        masks = [s.mask_path for s in data.train_defective if s.mask_path is not None]
        if not masks:
            raise FedinspectError("--masks real: no real defective training image with a mask")
        return masks
    folder = Path(settings.masks)
    if not folder.is_dir() or not list_images(folder):
        raise FedinspectError(f"{folder}: --masks must be 'generated', 'real' or a folder of mask images")
    return list_images(folder)


# ----------------------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------------------


def _cam_figure(detector: Any, examples: list[tuple[Any, Any]], data: StudyData, path: Path,
                scores: list[float]) -> None:
    """The CAM of each example test image over it, ground truth outlined (the shared example grid)."""
    import numpy as np

    from fedinspect.data.images import read_mask
    from fedinspect.evaluation.plots import plot_examples
    from fedinspect.evaluation.report import Example

    images = [image for _, image in examples]
    rows = []
    for (sample, image), cam, score in zip(examples, detector.cam(images), scores, strict=True):
        truth = np.zeros(image.shape[:2], dtype=bool)
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path)
            mask = (mask.max(axis=2) if mask.ndim == 3 else mask) != 0
            truth = mask if mask.shape == truth.shape else truth
        defect = data.defect_of.get(sample.image_path, "defect" if sample.label else "good")
        rows.append(Example(data.name, defect, sample.stem, image, cam, truth, float(score)))
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_examples(rows, path)


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.part")
    staging.write_text(json.dumps(content, indent=1))
    staging.replace(path)


def _check_settings(out: Path, recorded: dict[str, Any]) -> None:
    recorded = json.loads(json.dumps(recorded))  # tuples as lists, as they read back
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise FedinspectError(f"{path}: unreadable ({error}); remove it or choose another --out") from error
        if previous != recorded:
            changed = sorted(k for k in set(previous) | set(recorded) if previous.get(k) != recorded.get(k))
            details = "; ".join(f"{k}: {previous.get(k)!r} before, {recorded.get(k)!r} now" for k in changed)
            raise SettingsError(f"{out}: a synthesis study with other settings is there ({details}); its finished "
                                "cells would not be comparable: rerun with the same settings or choose another --out")
    else:
        _write_json(path, recorded)


def run_synthesis_study(data_dir: str | Path, out: str | Path, settings: SynthesisStudySettings,
                        progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) every cell, then write ``results.json`` and the report; returns the results.

    ``threads``: torch's CPU threads for the run (None: unchanged); one thread is much faster than two on a
    loaded machine. It does not change the results, so it is not a setting.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from fedinspect.data.images import read_image
    from fedinspect.supervised import SupervisedDetector, detection_scores

    data_dir, out = Path(data_dir), Path(out)
    started = time.perf_counter()
    data = load_study_data(data_dir, settings.seed, settings.real_fraction)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {**asdict(settings), "data": str(data_dir.resolve())})
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cache: dict[Path, Any] = {}

        def load(samples: list[Any]) -> list[Any]:
            for sample in samples:
                if sample.image_path not in cache:
                    cache[sample.image_path] = read_image(sample.image_path)
            return [cache[s.image_path] for s in samples]

        cells = settings.cells()
        todo = [cell for cell in cells if not (out / CELLS_DIR / f"{cell[0]}.json").is_file()]
        synthesis_file = out / CELLS_DIR / "synthesis.json"
        synthesis_seconds = json.loads(synthesis_file.read_text()) if synthesis_file.is_file() else {}
        detector = SupervisedDetector(**settings.detector_params(), progress=False)
        test_labels = np.array([s.label for s in data.test])
        rng = np.random.default_rng([settings.seed, 5])
        positives = [i for i, s in enumerate(data.test) if s.label]
        negatives = [i for i, s in enumerate(data.test) if not s.label]
        n_pos = min(len(positives), max(settings.cam_examples - settings.cam_examples // 4, 0))
        n_neg = min(len(negatives), settings.cam_examples - n_pos)
        shown = sorted([*rng.choice(positives, n_pos, replace=False), *rng.choice(negatives, n_neg, replace=False)])
        synthetic: dict[str, list[Any]] = {}
        bar = tqdm(todo, desc="synthesis study", unit="cell", disable=not progress)
        for name, setting, method, count in bar:
            bar.set_postfix_str(name)
            test_images = load(data.test)
            cell: dict[str, Any] = {"cell": name, "setting": setting, "method": method, "n_aug": count}
            if setting == PATCHCORE:
                cell.update(_patchcore_cell(load(data.train_good), test_images, test_labels, settings, progress))
                _write_json(out / CELLS_DIR / f"{name}.json", cell)
                continue
            goods = load(data.train_good)
            images, labels = list(goods), [0] * len(goods)
            if setting in (FULL_SHOT, BASELINE):
                if not data.train_defective:
                    raise FedinspectError(f"{data_dir}: no real defective training image for the {setting} cells")
                real = load(data.train_defective)
                images += real
                labels += [1] * len(real)
            if method is not None:
                if method not in synthetic:
                    made, seconds = synthesize_defects(goods, method, max(settings.counts), settings,
                                                       _region_masks(settings, data), progress)
                    synthetic[method] = made
                    synthesis_seconds[method] = {"count": len(made), "seconds": seconds}
                    _write_json(synthesis_file, synthesis_seconds)
                images += synthetic[method][:count]
                labels += [1] * count
            detector.fit(images, labels)
            start = time.perf_counter()
            probabilities = detector.predict_proba(test_images)
            cell["predict_s"] = time.perf_counter() - start
            cell.update(detection_scores(test_labels, probabilities))
            cell.update({"train_good": len(goods), "train_real_defective": sum(labels) - (count if method else 0),
                         "train_synthetic": count if method else 0, "fit_s": detector.fit_seconds_,
                         "best_epoch": detector.best_epoch_, "epochs_run": len(detector.history_),
                         "history": detector.history_})
            if shown:
                figure = out / CAMS_DIR / f"{name}.png"
                _cam_figure(detector, [(data.test[i], test_images[i]) for i in shown], data, figure,
                            [float(probabilities[i]) for i in shown])
                cell["cam_figure"] = figure.relative_to(out).as_posix()
            _write_json(out / CELLS_DIR / f"{name}.json", cell)
        bar.close()
    finally:
        torch.set_num_threads(previous_threads)
    results = summarize(out, settings, data)
    results["wall_s"] = time.perf_counter() - started
    _write_json(out / RESULTS_FILE, results)
    write_synthesis_report(out, results)
    return results


def _patchcore_cell(goods: list[Any], test_images: list[Any], test_labels: Any, settings: SynthesisStudySettings,
                    progress: bool) -> dict[str, Any]:
    """PatchCore fitted on the good training images but a held-out share that sets its decision threshold."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from fedinspect.detectors.registry import get_detector
    from fedinspect.supervised import detection_scores

    indices = np.arange(len(goods))
    fraction = settings.validation_fraction or 0.2
    fit_idx, held_idx = train_test_split(indices, test_size=fraction, random_state=settings.seed)
    detector = get_detector("patchcore", image_size=settings.image_size, seed=settings.seed, progress=progress)
    start = time.perf_counter()
    detector.fit([goods[i] for i in fit_idx], total=len(fit_idx))
    fit_s = time.perf_counter() - start
    held_scores, _ = detector.predict([goods[i] for i in held_idx], total=len(held_idx))
    threshold = float(np.percentile(held_scores, settings.patchcore_percentile))
    start = time.perf_counter()
    scores, _ = detector.predict(test_images, total=len(test_images))
    return {**detection_scores(test_labels, scores, threshold), "fit_s": fit_s,
            "predict_s": time.perf_counter() - start, "train_good": len(fit_idx), "threshold_images": len(held_idx),
            "train_real_defective": 0, "train_synthetic": 0}


# ----------------------------------------------------------------------------------------------------------
# summary and report
# ----------------------------------------------------------------------------------------------------------


def summarize(out: Path, settings: SynthesisStudySettings, data: StudyData) -> dict[str, Any]:
    """results.json's content, read back from the finished cells (nothing recomputed)."""
    cells = []
    for name, *_ in settings.cells():
        path = out / CELLS_DIR / f"{name}.json"
        if path.is_file():
            cells.append(json.loads(path.read_text()))
    by_name = {cell["cell"]: cell for cell in cells}

    def row(cell: dict[str, Any], model: str) -> dict[str, Any]:
        return {"model": model, "n_aug": cell["n_aug"], **{metric: cell[metric] for metric in METRICS},
                "cell": cell["cell"]}

    zero = [row(c, c["method"]) for c in cells if c["setting"] == ZERO_SHOT]
    if PATCHCORE in by_name:
        zero.append(row(by_name[PATCHCORE], "PatchCore (unsupervised)"))
    full = [row(by_name[BASELINE], "no synthesis (real defects only)")] if BASELINE in by_name else []
    full += [row(c, c["method"]) for c in cells if c["setting"] == FULL_SHOT]
    synthesis_file = out / CELLS_DIR / "synthesis.json"
    return {"data": {"name": data.name, "layout": data.layout, **data.counts()}, "settings": asdict(settings),
            "cells": cells, "tables": {"zero_shot": zero, "full_shot": full},
            "synthesis": json.loads(synthesis_file.read_text()) if synthesis_file.is_file() else {},
            "comparisons": _comparisons(cells, by_name)}


def _comparisons(cells: list[dict[str, Any]], by_name: dict[str, Any]) -> dict[str, Any]:
    """Best zero-shot AP per method against PatchCore's, full-shot against the baseline per N_aug."""
    out: dict[str, Any] = {}
    patchcore = by_name.get(PATCHCORE, {}).get("ap")
    baseline = by_name.get(BASELINE, {}).get("ap")
    for cell in cells:
        if cell["setting"] == ZERO_SHOT and patchcore is not None:
            out.setdefault("zero_shot_minus_patchcore", {})[cell["cell"]] = cell["ap"] - patchcore
        if cell["setting"] == FULL_SHOT and baseline is not None:
            out.setdefault("full_shot_minus_baseline", {})[cell["cell"]] = cell["ap"] - baseline
    return out


def write_synthesis_report(out: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html``: the seed's Tables 1 and 2, training details and CAM figures."""
    from fedinspect.evaluation.document import Document, Heading, Image, Note, Paragraph, Table
    from fedinspect.evaluation.report import format_metric, format_points

    data, settings = results["data"], results["settings"]
    doc = Document(f"Synthetic defects for a supervised detector: {data['name']} (seed 003's Tables 1-2)")
    split = ("its own train/test split (KolektorSDD2 layout)" if data["layout"] == "ksdd2" else
             f"a seeded split of the real defective test images, {settings['real_fraction']:.0%} per defect type "
             "to full-shot training, the rest with every test/good image as the test split")
    doc.add(Paragraph(
        f"Training: {data['train_good']} good images, {data['train_defective']} real defective images (full-shot "
        f"only); test: {data['test_defective']} defective and {data['test_good']} good images ({split}; seed "
        f"{settings['seed']}). Supervised detector: {settings['backbone']}, short side {settings['image_size']} px "
        f"(aspect kept), Adam lr {settings['lr']:g}, batch {settings['batch_size']}, at most {settings['epochs']} "
        f"epochs, early stopping on a {settings['validation_fraction']:.0%} validation share (patience "
        f"{settings['patience']}). Precision, recall and F1 at probability 0.5; PatchCore's at the "
        f"{settings['patchcore_percentile']:g}th percentile of held-out good images' scores. AP and AUROC need "
        "no threshold."))
    header = ["Model", "N_aug", "AP", "Precision", "Recall", "F1", "AUROC"]

    def table(rows: list[dict[str, Any]]) -> Table:
        return Table(header, [[r["model"], str(r["n_aug"]) if r["n_aug"] else "-",
                               *[format_metric(r[m]) for m in METRICS]] for r in rows])

    for key, title in (("zero_shot", "Table 1: zero-shot (no real defect in training)"),
                       ("full_shot", "Table 2: full-shot (real defects plus synthetic ones)")):
        rows = results["tables"][key]
        doc.add(Heading(2, title))
        if not rows:
            doc.add(Note("no finished cell."))
            continue
        doc.add(table(rows))
        best = max(rows, key=lambda r: r["ap"])
        doc.add(Paragraph(f"Best AP: {best['model']}" + (f" at N_aug = {best['n_aug']}" if best["n_aug"] else "")
                          + f" ({format_metric(best['ap'])})."))
    comparisons = results.get("comparisons", {})
    for key, title in (("zero_shot_minus_patchcore", "Zero-shot AP minus PatchCore's (points)"),
                       ("full_shot_minus_baseline", "Full-shot AP minus the no-synthesis baseline's (points)")):
        if comparisons.get(key):
            differences = [[cell, format_points(value)] for cell, value in comparisons[key].items()]
            doc.add(Heading(3, title), Table(["cell", "difference"], differences))
    cells = results["cells"]
    if cells:
        doc.add(Heading(2, "Training"), Table(
            ["cell", "good", "real defective", "synthetic", "epochs run", "best epoch", "fit (s)"],
            [[c["cell"], str(c.get("train_good", "")), str(c.get("train_real_defective", "")),
              str(c.get("train_synthetic", "")), str(c.get("epochs_run", "")), str(c.get("best_epoch", "")),
              format_metric(c.get("fit_s"), 1)] for c in cells]))
    if results.get("synthesis"):
        doc.add(Heading(2, "Synthesis time"), Table(
            ["method", "images", "seconds"],
            [[m, str(v["count"]), format_metric(v["seconds"], 1)] for m, v in results["synthesis"].items()]))
    figures = [c for c in cells if c.get("cam_figure")]
    if figures:
        doc.add(Heading(2, "Class-activation maps"),
                Paragraph("Test images with the CAM of the cell's detector (logit units: red argues defective); "
                          "ground truth outlined."))
        for cell in figures:
            doc.add(Image(cell["cam_figure"], f"{cell['cell']}: CAM on test images"))
    return doc.write(out)
