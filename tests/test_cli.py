from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fedinspect.cli import main


def test_fit_then_evaluate_writes_results_and_maps(mvtec_category: Path, tmp_path: Path, capsys) -> None:
    model_dir, results_dir = tmp_path / "model", tmp_path / "results"
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(model_dir), "--image-size", "48",
                 "--coreset-ratio", "0.5"]) == 0
    assert (model_dir / "memory_bank.safetensors").is_file()
    assert main(["-q", "evaluate", "--model", str(model_dir), "--data", str(mvtec_category),
                 "--out", str(results_dir)]) == 0
    printed = capsys.readouterr().out
    assert "widget" in printed and "image_auroc" in printed

    results = json.loads((results_dir / "results.json").read_text())
    assert set(results["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
    assert 0.0 <= results["image_auroc"] <= 1.0 and 0.0 <= results["pixel_auroc"] <= 1.0
    assert results["counts"] == {"train": None, "test": 3, "test_good": 1, "test_defective": 2, "regions": 3,
                                 "memory_bank": results["counts"]["memory_bank"],
                                 "parameters": results["counts"]["parameters"]}
    assert results["counts"]["parameters"] > 100_000  # the backbone's weights and the bank
    # three test images cannot be split 15/85 into shares that choose and report thresholds
    assert "too few test images" in results["thresholds"]["skipped"]
    assert results["timings"]["inference_ms_per_image"] > 0
    maps = sorted(p.relative_to(results_dir / "maps").as_posix() for p in (results_dir / "maps").rglob("*.png"))
    assert maps == ["crack/000.png", "crack/001.png", "good/000.png"]
    with Image.open(results_dir / "maps" / "crack" / "001.png") as image:
        assert image.mode == "I;16" and image.size == (64, 48)
    # the bright defect blob is hotter than the typical pixel of its map
    hot = np.asarray(Image.open(results_dir / "maps" / "crack" / "000.png")).astype(float)
    assert hot[5:10, 5:12].max() > np.median(hot)


def test_bad_data_gives_a_clear_message_and_exit_code(tmp_path: Path, capsys) -> None:
    assert main(["fit", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "nowhere: category folder not found" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "fedinspect", "--version"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.startswith("fedinspect ")


def test_fit_and_evaluate_a_trained_detector_with_its_options(mvtec_category: Path, tmp_path: Path, capsys) -> None:
    model_dir, results_dir = tmp_path / "model", tmp_path / "results"
    assert main(["-q", "fit", "--detector", "ae_mse", "--data", str(mvtec_category), "--out", str(model_dir),
                 "--image-size", "32", "--epochs", "2", "--lr", "0.002", "--patience", "0"]) == 0
    assert "2 epochs on 2 of them" in capsys.readouterr().out  # 3 images, one held out for validation
    settings = json.loads((model_dir / "ae_mse.json").read_text())
    assert settings["params"]["epochs"] == 2 and settings["params"]["learning_rate"] == 0.002
    assert main(["-q", "evaluate", "--model", str(model_dir), "--data", str(mvtec_category),
                 "--out", str(results_dir)]) == 0
    assert json.loads((results_dir / "results.json").read_text())["detector"] == "ae_mse"
    # an option the detector does not take is refused, naming those that take it
    assert main(["fit", "--detector", "ae_mse", "--data", str(mvtec_category), "--out", str(tmp_path / "m2"),
                 "--backbone", "efficientnet_lite2"]) == 2
    assert "--backbone does not apply to --detector ae_mse" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
