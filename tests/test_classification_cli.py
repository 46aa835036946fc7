"""``fedinspect classify`` and ``classify-experiment`` end to end on a tiny labelled dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedinspect.classification.runner import ClassifyConfig, run_classification
from fedinspect.classification.training import TrainSettings, epsilon_of
from fedinspect.cli import main
from tests.conftest import save_png


def _pattern(rng: np.random.Generator, kind: str, size: int = 24) -> np.ndarray:
    image = (90 + 20 * rng.random((size, size))).astype(np.uint8)
    if kind == "scratch":
        image[size // 2 - 1:size // 2 + 1, 2:-2] = 230
    elif kind == "dent":
        image[6:14, 6:14] = 20
    return np.repeat(image[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def labelled_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout category with 3 classes: 14 good, 8 scratch, 8 dent images of 24 x 24 px."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("classes") / "tile"
    for i in range(10):
        save_png(root / "train" / "good" / f"{i:03d}.png", _pattern(rng, "good"))
    for i in range(4):
        save_png(root / "test" / "good" / f"{i:03d}.png", _pattern(rng, "good"))
    for defect in ("scratch", "dent"):
        for i in range(8):
            save_png(root / "test" / defect / f"{i:03d}.png", _pattern(rng, defect))
            save_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", np.full((24, 24), 255, np.uint8))
    return root


def test_classify_writes_results_and_report(labelled_category: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["-q", "classify", "--data", str(labelled_category), "--out", str(out), "--model", "cnn",
                 "--clients", "2", "--rounds", "2", "--image-size", "16", "--dp-noise", "1.0", "--local-epochs", "1",
                 "--obfuscate", "average+shuffle+switch_row", "--obfuscation-key", "1234"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["good", "dent", "scratch"]
    assert results["split"] == {**results["split"], "train": 23, "test": 7}
    for key in ("accuracy", "macro_f1", "loss"):
        assert 0 <= results[key] and (key == "loss" or results[key] <= 1)
    assert [h["round"] for h in results["history"]] == [1, 2]
    assert set(results["epsilon"]) == {"client_0", "client_1"}
    for name, privacy in results["privacy"]["clients"].items():
        first, second = results["history"][0]["epsilon"][name], results["history"][1]["epsilon"][name]
        assert 0 < first < second == results["epsilon"][name]  # cumulative over the rounds
        assert second == pytest.approx(epsilon_of(privacy["accountant_history"], 1e-5))
    assert sum(map(sum, results["confusion_matrix"])) == 7
    assert results["obfuscation"]["methods"] == ["average", "shuffle", "switch_row"]
    assert "1234" not in (out / "results.json").read_text()  # the key is a secret
    for name in ("report.md", "report.html", "figures/learning_curves.png", "figures/confusion_matrix.png",
                 "figures/obfuscation_examples.png"):
        assert (out / name).is_file()
    assert "Differential privacy" in (out / "report.md").read_text()


def test_same_seed_gives_the_same_numbers(labelled_category: Path, tmp_path: Path) -> None:
    config = ClassifyConfig(model="cnn", clients=2, rounds=2, image_size=16, partition="dirichlet",
                            train=TrainSettings(local_epochs=1))
    first = run_classification(labelled_category, tmp_path / "a", config, progress=False, write_report=False)
    second = run_classification(labelled_category, tmp_path / "b", config, progress=False, write_report=False)
    timings = ("seconds", "evaluation_s")
    strip = [{k: v for k, v in h.items() if k not in timings} for h in first["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in timings} for h in second["history"]]
    assert set(first["history"][0]) >= {"accuracy", "loss", "train_loss", "epsilon", "bytes_per_client", *timings}


def test_transfer_model_trains_its_head_on_frozen_features(labelled_category: Path, tmp_path: Path) -> None:
    config = ClassifyConfig(model="mobile", clients=2, rounds=2, image_size=32, train=TrainSettings(local_epochs=2))
    results = run_classification(labelled_category, tmp_path / "mobile", config, progress=False, write_report=False)
    assert results["config"]["model"] == "mobile" and len(results["history"]) == 2
    assert results["accuracy"] >= 0.5  # distinct patterns: the pretrained features separate them


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "/nonexistent/tiles"], "/nonexistent/tiles"),
    (["--obfuscate", "blur"], "unknown obfuscation"),
    (["--clients", "100"], "cannot split"),
    (["--dp-noise", "-1"], "noise multiplier"),
])
def test_bad_input_is_reported_clearly(labelled_category: Path, tmp_path: Path, capsys, args, message) -> None:
    base = {"--data": str(labelled_category), "--out": str(tmp_path / "x"), "--image-size": "16", "--rounds": "1"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code = main(["-q", "classify", *[part for pair in base.items() for part in pair]])
    assert code == 2
    assert message in capsys.readouterr().err


def test_experiment_writes_tables_and_resumes(labelled_category: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "experiment"
    args = ["-q", "classify-experiment", "--data", str(labelled_category), "--out", str(out), "--models", "cnn",
            "--obfuscations", "none,average+shuffle+switch_row", "--noise", "0.05", "--target-epsilon", "10",
            "--rounds", "1", "--clients", "2", "--cnn-image-size", "16", "--local-epochs", "1"]
    assert main(args) == 0
    summary = json.loads((out / "experiment.json").read_text())
    assert [(r["table"], r["obfuscation"]) for r in summary["rows"]] == [
        ("I", "none"), ("I", "average+shuffle+switch_row"), ("III", "average+shuffle+switch_row"),
        ("III", "average+shuffle+switch_row")]
    targeted = summary["rows"][3]
    assert targeted["target_epsilon"] == 10 and 9.5 <= targeted["epsilon_max"] <= 10.05  # hits the target
    assert summary["rows"][2]["epsilon_max"] > 100  # the seed's noise 0.05, even after one round
    report = (out / "report.md").read_text()
    assert "Table I" in report and "Table III" in report and "no meaningful privacy" in report
    done = out / "runs" / "cnn-plain" / "results.json"
    stamp = done.stat().st_mtime_ns
    assert main(args) == 0
    assert done.stat().st_mtime_ns == stamp  # read back, not recomputed


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    ClassifyConfig(model="cnn", clients=2, rounds=2, image_size=16, obfuscate=("shuffle",), obfuscation_key=77,
                   train=TrainSettings(local_epochs=1, noise_multiplier=1.0)),
    # the DP recipe's parts: view averaging, projection, the DP mean round of the centered head
    ClassifyConfig(model="mobile", clients=2, rounds=2, image_size=24, pooling="avgmax", views=2, project=16,
                   head="centered", train=TrainSettings(local_epochs=2, noise_multiplier=1.0, optimizer="sgd",
                                                        lr=10.0, batch_size=64, momentum=0.0)),
], ids=["cnn", "centered"])
def test_flower_simulation_gives_the_in_process_numbers(labelled_category: Path, tmp_path: Path,
                                                        config: ClassifyConfig) -> None:
    from fedinspect.classification.task import ClassificationTask
    from fedinspect.federation.rounds_flower import run_simulation

    here = run_classification(labelled_category, tmp_path / "here", config, progress=False, write_report=False)
    flower = run_simulation(ClassificationTask(config, labelled_category, write_report=False), tmp_path / "flower",
                            progress=False)
    assert (here["engine"], flower["engine"]) == ("in-process", "flower-sim")
    assert flower["missing_clients"] == here["missing_clients"] == []
    for a, b in zip(here["history"], flower["history"], strict=True):
        assert (a["accuracy"], a["loss"], a.get("train_loss"), a["epsilon"], a["bytes_per_client"]) == (
            b["accuracy"], b["loss"], b.get("train_loss"), b["epsilon"], b["bytes_per_client"])
    assert here["epsilon"] == flower["epsilon"]  # the accountant persists in context.state across rounds
    assert here["privacy"] == flower["privacy"] and here["confusion_matrix"] == flower["confusion_matrix"]


@pytest.mark.real_data
def test_magnetic_tile_gives_the_six_classes(real_data: Path) -> None:
    from fedinspect.classification.data import labelled_view

    category = real_data / "mtd" / "magnetic_tile"
    if not category.is_dir():
        pytest.skip(f"{category} absent")
    view = labelled_view(category)
    assert view.counts() == {"good": 581, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
