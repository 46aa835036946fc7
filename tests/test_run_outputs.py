"""Output folders: written all at once, replaced only by a complete run, locked against a second writer."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedinspect.cli import main
from fedinspect.errors import FedinspectError
from fedinspect.run_folder import FolderBusyError, lock_path, staged_output

from .conftest import save_png, textured_image

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to compare a folder before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def _old_run(folder: Path) -> dict[str, bytes]:
    """A previous complete run, with a map the next run will not write."""
    (folder / "maps" / "old_category").mkdir(parents=True)
    (folder / "maps" / "old_category" / "0.png").write_bytes(b"old map")
    (folder / "results.json").write_text('{"run": "old"}')
    (folder / "partition.json").write_text('{"partition": "old"}')
    return _tree(folder)


def test_staged_output_replaces_on_success_and_keeps_the_target_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "run"
    before = _old_run(target)
    with pytest.raises(RuntimeError, match="boom"), staged_output(target) as staging:
        (staging / "results.json").write_text("half")
        raise RuntimeError("boom")
    assert _tree(target) == before and _leftovers(tmp_path) == []

    with staged_output(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "results.json").write_text('{"run": "new"}')
    assert _tree(target) == {"results.json": b'{"run": "new"}'}  # no old map beside the new results
    assert _leftovers(tmp_path) == []

    with pytest.raises(FedinspectError, match="which this run reads"), staged_output(target, inputs=[target / "a"]):
        pass
    documents = tmp_path / "documents"
    (documents / "thesis.tex").parent.mkdir()
    (documents / "thesis.tex").write_text("mine")
    with pytest.raises(FedinspectError, match="not a fedinspect output folder"), staged_output(documents):
        pass
    assert (documents / "thesis.tex").read_text() == "mine"


def test_a_folder_being_written_is_refused_to_a_second_writer(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with staged_output(target), pytest.raises(FolderBusyError, match=re.escape(str(target))), staged_output(target):
        pass
    with staged_output(target) as staging:  # released: usable again
        (staging / "patchcore.json").write_text("{}")
    assert (target / "patchcore.json").is_file()


def _two_categories(root: Path) -> Path:
    rng = np.random.default_rng(11)
    for name in ("bolt", "nut"):
        for i in range(3):
            save_png(root / name / "train" / "good" / f"{i:03d}.png", textured_image(rng, 40, 40))
        save_png(root / name / "test" / "good" / "000.png", textured_image(rng, 40, 40))
        image = textured_image(rng, 40, 40)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10:20] = 255
        image[mask > 0] = 255
        save_png(root / name / "test" / "dent" / "000.png", image)
        save_png(root / name / "ground_truth" / "dent" / "000_mask.png", mask)
    return root


@pytest.mark.slow  # two runs (two processes below)
def test_a_federation_failing_in_its_second_category_leaves_the_previous_run_intact(tmp_path: Path) -> None:
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig, run_federation

    data = _two_categories(tmp_path / "data")
    good = data / "nut" / "test" / "good" / "000.png"
    intact = good.read_bytes()
    good.write_bytes(intact[:40])  # the second category's test image is truncated
    out = tmp_path / "run"
    before = _old_run(out)
    config = FederationConfig(clients=2, global_size=200, centralized=False, compare_shared=False,
                              settings=RoundSettings(image_size=32))
    with pytest.raises(FedinspectError, match=r"nut.*000\.png"):
        run_federation(data, out, config, progress=False)
    assert _tree(out) == before  # neither a new partition.json nor the first category's maps
    assert _leftovers(tmp_path) == []

    good.write_bytes(intact)
    results = run_federation(data, out, config, progress=False)
    after = _tree(out)
    assert json.loads(after["results.json"])["categories"].keys() == {"bolt", "nut"} == results["categories"].keys()
    assert "maps/old_category/0.png" not in after and "maps/nut/good/000.png" in after
    assert json.loads(after["partition.json"])["partition"] != "old"


def test_evaluating_again_leaves_no_old_maps_beside_the_new_results(mvtec_category: Path, tmp_path: Path) -> None:
    model, out = tmp_path / "model", tmp_path / "results"
    assert main(["-q", "fit", "--data", str(mvtec_category), "--out", str(model), "--image-size", "32"]) == 0
    before = _old_run(out)
    assert main(["-q", "evaluate", "--model", str(model), "--data", str(tmp_path / "missing"),
                 "--out", str(out)]) == 2
    assert _tree(out) == before
    assert main(["-q", "evaluate", "--model", str(model), "--data", str(mvtec_category), "--out", str(out)]) == 0
    files = _tree(out)
    assert not any(name.startswith("maps/old_category") for name in files)
    assert {"maps/crack/000.png", "maps/crack/001.png", "maps/good/000.png"} <= files.keys()
    assert json.loads(files["results.json"])["category"] == "widget"
    assert main(["-q", "evaluate", "--model", str(model), "--data", str(mvtec_category), "--out", str(tmp_path)]) == 2
    assert (model / "patchcore.json").is_file()  # --out above the model folder is refused, not replaced


@pytest.mark.slow  # two runs (two processes below)
def test_a_second_fit_into_a_locked_folder_fails_and_succeeds_once_released(mvtec_category: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, "-m", "fedinspect", "-q", "fit", "--data", str(mvtec_category), "--out", str(out),
               "--image-size", "32"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running fit holds it
        busy = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert busy.returncode == 2
    assert f"fedinspect: error: {out}: another fedinspect process is writing this folder" in busy.stderr
    assert not out.exists()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "patchcore.json").is_file() and (out / "memory_bank.safetensors").is_file()
