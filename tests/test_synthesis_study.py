"""The synthesis study, reduced (tiny images, one method, one count, one epoch) on a category drawn here."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.errors import SettingsError
from fedinspect.evaluation.report import format_metric
from fedinspect.study.synthesis import (
    SynthesisStudySettings,
    load_study_data,
    run_synthesis_study,
    synthesize_defects,
)

SETTINGS = SynthesisStudySettings(methods=("cutpaste",), counts=(6,), epochs=1, image_size=64, batch_size=8,
                                  validation_fraction=0.25, cam_examples=2)


def _tile(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(120, 10, (64, 80)).clip(0, 255)
    mask = np.zeros((64, 80), dtype=np.uint8)
    if defect:
        top, left = rng.integers(5, 40, 2)
        image[top:top + 12, left:left + 12] = 20
        mask[top:top + 12, left:left + 12] = 255
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), mask


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiles"
    rng = np.random.default_rng(0)
    for folder, n, defect in (("train/good", 12, False), ("test/good", 6, False), ("test/hole", 8, True)):
        (root / folder).mkdir(parents=True)
        if defect:
            (root / "ground_truth/hole").mkdir(parents=True)
        for index in range(n):
            image, mask = _tile(rng, defect)
            Image.fromarray(image).save(root / folder / f"{index:03d}.png")
            if defect:
                Image.fromarray(mask).save(root / "ground_truth/hole" / f"{index:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def study(category: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study") / "out"
    return out, run_synthesis_study(category, out, SETTINGS, progress=False, threads=1)


def test_split_of_an_mvtec_category(category: Path) -> None:
    data = load_study_data(category, seed=0, real_fraction=0.5)
    assert data.counts() == {"train_good": 12, "train_defective": 4, "test_good": 6, "test_defective": 4}
    train = {s.image_path for s in data.train_defective}
    assert not train & {s.image_path for s in data.test}
    assert all(s.mask_path is not None and s.mask_path.name == f"{s.stem}_mask.png" for s in data.train_defective)
    again = load_study_data(category, seed=0, real_fraction=0.5)
    assert [s.image_path for s in again.train_defective] == [s.image_path for s in data.train_defective]


def test_files_written_and_tables_equal_cells(study: tuple[Path, dict]) -> None:
    out, results = study
    names = ["zero-shot_cutpaste_6", "baseline", "full-shot_cutpaste_6", "patchcore"]
    for name in names:
        assert (out / "cells" / f"{name}.json").is_file()
    for name in names[:3]:
        assert (out / "cams" / f"{name}.png").stat().st_size > 1000
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tables"] == results["tables"]
    cells = {name: json.loads((out / "cells" / f"{name}.json").read_text()) for name in names}
    zero, full = on_disk["tables"]["zero_shot"], on_disk["tables"]["full_shot"]
    assert [r["cell"] for r in zero] == ["zero-shot_cutpaste_6", "patchcore"]
    assert [r["cell"] for r in full] == ["baseline", "full-shot_cutpaste_6"]
    for row in zero + full:
        for metric in ("ap", "precision", "recall", "f1", "auroc"):
            assert row[metric] == cells[row["cell"]][metric]
    assert cells["zero-shot_cutpaste_6"]["train_synthetic"] == 6
    assert cells["zero-shot_cutpaste_6"]["train_real_defective"] == 0
    assert cells["full-shot_cutpaste_6"]["train_real_defective"] == 4
    assert cells["baseline"]["train_synthetic"] == 0
    assert cells["zero-shot_cutpaste_6"]["n_good"] == 6 and cells["zero-shot_cutpaste_6"]["n_defective"] == 4
    differences = on_disk["comparisons"]["zero_shot_minus_patchcore"]
    assert differences["zero-shot_cutpaste_6"] == pytest.approx(cells["zero-shot_cutpaste_6"]["ap"]
                                                                - cells["patchcore"]["ap"])
    report = (out / "report.md").read_text()
    assert "Table 1: zero-shot" in report and "Table 2: full-shot" in report
    for row in zero + full:
        assert f"| {format_metric(row['ap'])} |" in report
    assert (out / "report.html").is_file()


def test_rerun_skips_finished_cells_and_refuses_other_settings(study, category, monkeypatch) -> None:
    out, results = study
    from fedinspect.supervised.detector import SupervisedDetector

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(SupervisedDetector, "fit", refuse)
    again = run_synthesis_study(category, out, SETTINGS, progress=False, threads=1)
    assert again["tables"] == results["tables"]
    with pytest.raises(SettingsError, match=r"counts: \[6\] before, \[7\] now"):
        run_synthesis_study(category, out, replace(SETTINGS, counts=(7,)), progress=False)


def test_a_missing_cell_runs_again_with_the_same_result(study, category) -> None:
    out, _ = study
    cell = out / "cells" / "baseline.json"
    before = json.loads(cell.read_text())
    cell.unlink()
    run_synthesis_study(category, out, SETTINGS, progress=False, threads=1)
    after = json.loads(cell.read_text())
    for metric in ("ap", "precision", "recall", "auroc"):
        assert after[metric] == pytest.approx(before[metric], abs=1e-6)


def test_synthetic_defects_are_those_of_the_synthesize_command(category: Path, tmp_path: Path) -> None:
    from fedinspect.data.images import read_image
    from fedinspect.synthesis.commands import synthesize

    manifest = synthesize(category, tmp_path / "syn", ("cutpaste",), 3, seed=0, progress=False)
    data = load_study_data(category, seed=0, real_fraction=0.5)
    goods = [read_image(s.image_path) for s in data.train_good]
    made, _ = synthesize_defects(goods, "cutpaste", 3, SETTINGS, [], progress=False)
    for image, entry in zip(made, manifest["images"], strict=True):
        np.testing.assert_array_equal(image, read_image(tmp_path / "syn" / entry["image"]))


def test_kolektor_layout_keeps_its_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, labels in (("train", (0, 0, 1)), ("test", (1, 0))):
        (tmp_path / "k" / split).mkdir(parents=True)
        for index, label in enumerate(labels):
            image, mask = _tile(rng, bool(label))
            Image.fromarray(image).save(tmp_path / "k" / split / f"{index}.png")
            Image.fromarray(mask).save(tmp_path / "k" / split / f"{index}_GT.png")
    data = load_study_data(tmp_path / "k", seed=0, real_fraction=0.5)
    assert data.layout == "ksdd2"
    assert data.counts() == {"train_good": 2, "train_defective": 1, "test_good": 1, "test_defective": 1}


def test_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="unknown method"):
        SynthesisStudySettings(methods=("blur",))
    with pytest.raises(SettingsError, match="counts"):
        SynthesisStudySettings(counts=(0,))
    with pytest.raises(SettingsError, match="inpaint-model"):
        SynthesisStudySettings(methods=("diffusion",))


def test_command_line_options_and_lazy_imports() -> None:
    from fedinspect.study.synthesis_command import add_synthesis_study_command

    parser = argparse.ArgumentParser()
    add_synthesis_study_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synthesis-study", "--data", "d", "--out", "o", "--methods", "perlin,cutpaste",
                              "--counts", "5,10", "--epochs", "2"])
    assert (args.methods, args.counts, args.epochs, args.image_size, args.lr) == ("perlin,cutpaste", "5,10", 2,
                                                                                   224, 1e-4)
    help_text = parser._subparsers._group_actions[0].choices["synthesis-study"].format_help()
    assert "(default: 80,100,120)" in help_text and "(default: offline)" in help_text
    probe = ("import sys, argparse; from fedinspect.study.synthesis_command import add_synthesis_study_command; "
             "add_synthesis_study_command(argparse.ArgumentParser().add_subparsers()); "
             "print(','.join(m for m in ('torch', 'numpy', 'PIL', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
