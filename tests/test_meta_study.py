"""The meta-study (seed 002's experiments as one command): files, leave-one-out, resume, tables against the cells.

One reduced study (three generated tasks, 32 px, two meta-steps, two fine-tuning epochs, all experiments, all
images and 5 shots) is run once through the command's own parser and function and read back by every test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedinspect.meta.study as study
from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.meta.commands import (
    BACKBONE_CHOICES,
    EXPERIMENT_CHOICES,
    REFERENCE_CHOICES,
    add_meta_commands,
    parse_shots,
)
from fedinspect.meta.study import EXPERIMENTS, MetaStudySettings, classification_metrics
from tests.conftest import write_blob_category

TASKS = ("alpha", "beta", "gamma")
ARGS = ["--image-size", "32", "--meta-steps", "2", "--support", "8", "--query", "4", "--epochs", "2", "--width",
        "8", "--shots", "all,5", "--gradcam-images", "2", "--meta-batch", "4"]
ALL_VARIANTS = ("maml", "random", "imagenet", "ca-high", "ca-both", "ca-none", "no-sn", "no-sn-ca")
META_VARIANTS = ("maml", "ca-high", "ca-both", "ca-none", "no-sn", "no-sn-ca")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedinspect")
    add_meta_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["meta-study", *argv])


def run(data: Path, out: Path, extra: list[str] | None = None) -> int:
    args = parse(["--data", str(data), "--out", str(out), *ARGS, *(extra or [])])
    args.quiet = True
    return args.run(args)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reduced study, run once, with a record of the task of every episode drawn during each meta-training."""
    import torch

    root = tmp_path_factory.mktemp("meta_study")
    data = root / "data"
    for seed, name in enumerate(TASKS):
        write_blob_category(data / name, seed=seed, n_train=8, n_test=5, shape=(32, 40))
    drawn: list[tuple[str, list[str]]] = []
    original_meta_weights, original_sample = study._meta_weights, study.sample_episode

    def meta_weights(out, target, *args, **kwargs):
        drawn.append((target, []))
        return original_meta_weights(out, target, *args, **kwargs)

    def sample_episode(split, *args, **kwargs):
        drawn[-1][1].append(split.name)
        return original_sample(split, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(study, "_meta_weights", meta_weights)
            patch.setattr(study, "sample_episode", sample_episode)
            assert run(data, root / "out") == 0
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "out": root / "out", "drawn": drawn}


def cell(out: Path, task: str, variant: str, shots: str) -> dict[str, Any]:
    return json.loads((out / "cells" / task / f"{variant}@{shots}.json").read_text())


def markdown_table(report: str, title: str) -> list[list[str]]:
    """The body rows of the report's pipe table under the heading ``## title``."""
    section = report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in lines[2:]]


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


# ---------------------------------------------------------------------------------------------- files


def test_every_cell_and_the_report_are_written_and_read_back(finished) -> None:
    out = finished["out"]
    for task in TASKS:
        for variant in ALL_VARIANTS:
            for shots, fit_at_most in (("all", None), ("5shot", 5)):
                record = cell(out, task, variant, shots)
                assert (record["task"], record["variant"]) == (task, variant)
                assert record["shots"] == (None if shots == "all" else 5)
                if fit_at_most:  # 5 shots: fit + validation images are the 5 drawn
                    assert record["fit_images"] + record["validation_images"] == 5
                assert 1 <= record["epochs_to_converge"] <= record["epochs_run"] <= 2
                assert set(record["metrics"]) == {"accuracy", "recall", "precision", "f1", "auroc"}
                with np.load(out / "cells" / task / record["gradcam"], allow_pickle=False) as maps:
                    assert maps["cams"].shape == (2, 32, 32)
                    assert np.all((maps["cams"] >= 0) & (maps["cams"] <= 1))
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["cells"]) == len(TASKS) * len(ALL_VARIANTS) * 2
    for record in summary["cells"]:
        on_disk = cell(out, record["task"], record["variant"], "all" if record["shots"] is None else "5shot")
        assert record["metrics"] == on_disk["metrics"]
    for name in ("report.md", "report.html"):
        assert (out / name).is_file()
    for task in TASKS:
        for shots in ("all", "5shot"):
            assert (out / "gradcam" / f"{task}@{shots}.png").stat().st_size > 0
            assert f"gradcam/{task}@{shots}.png" in (out / "report.md").read_text()
    # a 4-conv net has no ImageNet weights: the report says what the ImageNet row is instead
    assert "EfficientNet-Lite0" in (out / "report.md").read_text()


def test_same_test_images_for_every_variant_of_a_task(finished) -> None:
    out = finished["out"]
    for task in TASKS:
        sizes = {(cell(out, task, v, "all")["test_images"], cell(out, task, v, "all")["fit_images"])
                 for v in ALL_VARIANTS}
        assert len(sizes) == 1


# ---------------------------------------------------------------------------------------------- leave-one-out


def test_meta_training_never_sees_the_left_out_task(finished) -> None:
    # every meta-trained cell asks for its meta-weights; only the first cell of a task and model trains them (the
    # 5-shot cell reads them back, drawing nothing)
    assert len(finished["drawn"]) == len(TASKS) * len(META_VARIANTS) * 2
    trainings = [(target, names) for target, names in finished["drawn"] if names]
    assert len(trainings) == len(TASKS) * len(META_VARIANTS)
    for target, names in trainings:
        others = set(TASKS) - {target}
        assert names and target not in names
        assert set(names) == others  # a meta-batch of 4 takes both remaining tasks at every step
    out = finished["out"]
    for task in TASKS:
        for variant in ALL_VARIANTS:
            record = cell(out, task, variant, "all")
            others = sorted(set(TASKS) - {task})
            if variant in META_VARIANTS:
                assert record["meta_tasks"] == others and record["meta_tasks_drawn"] == others
            else:
                assert record["meta_tasks"] == [] and record["meta_train_s"] is None


def test_a_single_task_is_refused(tmp_path: Path) -> None:
    write_blob_category(tmp_path / "data" / "only", seed=0, n_train=4, n_test=3, shape=(32, 32))
    with pytest.raises(FedinspectError, match="two tasks or more"):
        study.run_meta_study([tmp_path / "data"], tmp_path / "out", MetaStudySettings(image_size=32), progress=False)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_skips_finished_cells_refuses_other_settings_and_redoes_a_missing_cell(finished, capsys) -> None:
    out, data = finished["out"], finished["data"]
    files = sorted((out / "cells").rglob("*"))
    stamps = {path: path.stat().st_mtime_ns for path in files}
    capsys.readouterr()
    assert run(data, out) == 0
    assert "0 cells run, 48 reused" in capsys.readouterr().out
    assert all(path.stat().st_mtime_ns == stamps[path] for path in files)

    with pytest.raises(SettingsError, match=r"epochs 2 -> 3"):
        run(data, out, ["--epochs", "3"])
    write_blob_category(data / "delta", seed=7, n_train=8, n_test=5, shape=(32, 40))
    try:
        with pytest.raises(SettingsError, match="tasks"):
            run(data, out)
    finally:
        import shutil

        shutil.rmtree(data / "delta")

    missing = out / "cells" / "beta" / "ca-high@5shot.json"
    missing.unlink()
    assert run(data, out) == 0
    assert "1 cells run, 47 reused" in capsys.readouterr().out
    assert missing.is_file()
    meta_weights = out / "cells" / "beta" / "meta-conv4-ca_high-sn.safetensors"
    assert meta_weights.stat().st_mtime_ns == stamps[meta_weights]  # the meta-weights were read back, not retrained


# ---------------------------------------------------------------------------------------------- tables


def test_tables_hold_the_numbers_of_the_cells(finished) -> None:
    out = finished["out"]
    report = (out / "report.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    sizes = {task["name"]: task["images"] for task in summary["tasks"]}

    rows = markdown_table(report, "Table 2: AUROC per left-out task")
    columns = [(v, s) for s in ("all", "5shot") for v in ("random", "imagenet", "maml")]
    for row, task in zip(rows, TASKS, strict=False):
        assert row == [task, *[pct(cell(out, task, v, s)["metrics"]["auroc"]) for v, s in columns]]
    aurocs = {c: [cell(out, t, *c)["metrics"]["auroc"] for t in TASKS] for c in columns}
    assert rows[3] == ["Avg", *[pct(np.mean(aurocs[c])) for c in columns]]
    weights = [sizes[t] for t in TASKS]
    assert rows[4] == ["Weighted avg", *[pct(np.average(aurocs[c], weights=weights)) for c in columns]]

    rows = markdown_table(report, "Table 3: MAML against random initialisation")
    keys = ("accuracy", "recall", "precision", "f1", "auroc")
    expected = []
    for task in TASKS:
        for index, (variant, label) in enumerate((("random", "Random"), ("imagenet", "ImageNet (Lite0)"),
                                                  ("maml", "MAML"))):
            record = cell(out, task, variant, "all")
            values = [record["metrics"][k] for k in keys]
            expected.append([task if index == 0 else "", label, str(record["epochs_to_converge"]),
                             *map(pct, values), pct(np.mean(values))])
    assert rows == expected

    rows = markdown_table(report, "Table 4: coordinate attention placement, Recall (5-shot)")
    for row, (variant, label) in zip(rows, (("maml", "Low level"), ("ca-high", "High level"),
                                            ("ca-both", "Multiple"), ("ca-none", "None")), strict=True):
        recalls = [100 * cell(out, t, variant, "5shot")["metrics"]["recall"] for t in TASKS]
        assert row == [label, *[f"{r:.1f}" for r in recalls], f"{np.mean(recalls):.1f}",
                       f"{np.mean((np.array(recalls) - np.mean(recalls)) ** 2):.1f}"]

    rows = markdown_table(report, "Table 5: ablation")
    labels = (("maml", "Ours"), ("no-sn", "Ours-SN"), ("ca-none", "Ours-CA"), ("no-sn-ca", "Ours-CA-SN"))
    assert rows == [[task if i == 0 else "", label, *[pct(cell(out, task, v, "all")["metrics"][k]) for k in keys]]
                    for task in TASKS for i, (v, label) in enumerate(labels)]

    # results.json keeps the very tables the report shows
    assert summary["tables"]["table5@all"]["rows"] == rows
    assert summary["tables"]["table3@all"]["rows"] == expected

    targets = summary["targets"]["maml_vs_random"]["all"]
    better = sum(cell(out, t, "maml", "all")["metrics"]["auroc"] > cell(out, t, "random", "all")["metrics"]["auroc"]
                 for t in TASKS)
    assert targets["auroc_better"] == better and targets["auroc_majority"] == (better >= 2)


def test_metrics_against_a_hand_computation() -> None:
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([0.1, 0.6, 0.4, 0.9])
    # predictions at 0.5: 0, 1, 0, 1 -> one true positive, one false positive, one false negative
    # AUROC: of the 4 (defective, good) pairs, 0.4 > 0.1, 0.9 > 0.1, 0.9 > 0.6 are ordered: 3/4
    assert classification_metrics(labels, probabilities) == {
        "accuracy": 0.5, "recall": 0.5, "precision": 0.5, "f1": 0.5, "auroc": 0.75}


# ---------------------------------------------------------------------------------------------- command line


def test_command_options_defaults_and_lists() -> None:
    args = parse(["--data", "a", "b", "--out", "o"])
    assert args.data == ["a", "b"] and parse_shots(args.shots) == (None,)
    assert (args.image_size, args.seed, args.epochs, args.meta_steps) == (64, 0, 30, 60)
    assert parse_shots("all,20") == (None, 20)
    with pytest.raises(FedinspectError, match="--shots"):
        parse_shots("all,some")
    assert EXPERIMENT_CHOICES == EXPERIMENTS
    from fedinspect.meta.model import BACKBONES
    from fedinspect.meta.tasks import REFERENCE_RULES

    assert BACKBONE_CHOICES == BACKBONES and REFERENCE_CHOICES == REFERENCE_RULES
    parser = argparse.ArgumentParser(prog="fedinspect")
    add_meta_commands(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["meta-study", "--help"])


def test_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("(default: 64)", "(default: init,placement,ablation)", "(default: all)", "(default: 1e-05)",
                 "(default: nearest)"):
        assert part in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_building_the_command_imports_no_torch() -> None:
    code = ("import argparse, sys\nfrom fedinspect.meta.commands import add_meta_commands\n"
            "add_meta_commands(argparse.ArgumentParser().add_subparsers())\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_settings_are_validated() -> None:
    with pytest.raises(SettingsError, match="unknown experiment"):
        MetaStudySettings(experiments=("init", "bogus"))
    with pytest.raises(SettingsError, match="shots"):
        MetaStudySettings(shots=(2,))
    with pytest.raises(SettingsError, match="image_size"):
        MetaStudySettings(image_size=16)
    with pytest.raises(SettingsError, match="backbone"):
        MetaStudySettings(backbone="resnet")
    settings = MetaStudySettings(experiments=("ablation",))
    assert settings.variants == ("maml", "ca-none", "no-sn", "no-sn-ca")
    assert "experiments" not in settings.record() and "shots" not in settings.record()
