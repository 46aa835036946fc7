"""``fedinspect synthesize``: the MVTec-layout folder it writes reads back, masks match the images, runs are
reproducible, nothing is overwritten, bad inputs are errors that name the file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.data.dataset import CategoryDataset
from fedinspect.data.images import read_image, read_mask
from fedinspect.errors import DataError, FedinspectError, WeightsNotFoundError
from fedinspect.synthesis.commands import GRID, MANIFEST, add_synthesis_commands, parse_methods, synthesize

from .conftest import save_png


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_synthesis_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synthesize", *argv])
    args.quiet = True
    return args.run(args)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))
            if p.name != GRID}


def test_written_folder_reads_back_and_every_mask_matches_its_image(mvtec_category, tmp_path):
    out = tmp_path / "synthetic"
    assert run_cli("--data", str(mvtec_category), "--method", "perlin,cutpaste,cutpaste_scar,memseg",
                   "--count", "5", "--out", str(out), "--seed", "3") == 0
    dataset = CategoryDataset(out)
    assert dataset.layout == "mvtec"
    assert dataset.defect_types == ["cutpaste", "cutpaste_scar", "memseg", "perlin"]
    assert len(dataset.test) == 20 and all(s.label == 1 for s in dataset.test)
    assert len(dataset.train) == 3  # the 3 good images of the category, cycled over 5 draws
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["seed"] == 3 and manifest["count"] == 5 and set(manifest["methods"]) == set(dataset.defect_types)
    assert len(manifest["images"]) == 20
    for entry in manifest["images"]:
        result = read_image(out / entry["image"])
        source = read_image(mvtec_category / entry["source"])
        mask = read_mask(out / entry["mask"]) > 0
        np.testing.assert_array_equal(np.any(result != source, axis=2), mask)
        assert entry["defect_pixels"] == mask.sum() > 0
        np.testing.assert_array_equal(read_image(out / "train" / "good" / Path(entry["source"]).name), source)
    sample = dataset.test[0]
    regions = dataset.load_regions(sample, dataset.load_image(sample).shape[:2])
    assert regions and sum(r.mask.sum() for r in regions) == (read_mask(sample.ground_truth[0]) > 0).sum()
    grid = Image.open(out / GRID)
    assert grid.format == "PNG" and grid.size[0] > 500
    assert not list(tmp_path.glob(".synthetic.partial-*"))  # the staging folder is gone


def test_same_seed_same_files_other_seed_other_files_and_methods_independent(mvtec_category, tmp_path):
    synthesize(mvtec_category, tmp_path / "a", ["perlin", "cutpaste"], 3, seed=1, progress=False)
    synthesize(mvtec_category, tmp_path / "b", ["perlin", "cutpaste"], 3, seed=1, progress=False)
    synthesize(mvtec_category, tmp_path / "c", ["perlin", "cutpaste"], 3, seed=2, progress=False)
    synthesize(mvtec_category, tmp_path / "d", ["cutpaste"], 3, seed=1, progress=False)
    a, b, c, d = (files(tmp_path / name) for name in "abcd")
    assert a == b
    assert {k: v for k, v in a.items() if "/perlin/" in k} != {k: v for k, v in c.items() if "/perlin/" in k}
    # a run of cutpaste alone draws the same cutpaste images as a run with perlin too
    assert {k: v for k, v in d.items() if "/cutpaste/" in k} == {k: v for k, v in a.items() if "/cutpaste/" in k}


def test_a_previous_run_or_any_other_folder_is_never_overwritten(mvtec_category, tmp_path):
    out = tmp_path / "out"
    synthesize(mvtec_category, out, ["cutpaste"], 2, progress=False)
    before = files(out)
    with pytest.raises(FedinspectError, match="previous synthesis run"):
        synthesize(mvtec_category, out, ["perlin"], 2, progress=False)
    assert files(out) == before
    other = tmp_path / "documents"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FedinspectError, match="not empty"):
        synthesize(mvtec_category, other, ["perlin"], 2, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    synthesize(mvtec_category, tmp_path / "empty", ["perlin"], 1, progress=False)  # an empty folder is fine


def _resized(mask_file: str, shape: tuple[int, int]) -> np.ndarray:
    mask = read_mask(mask_file)
    mask = (mask.max(axis=2) if mask.ndim == 3 else mask) > 0
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]),
                                                                          Image.Resampling.NEAREST)) > 0


def test_real_and_drawn_masks_bound_the_defects(mvtec_category, tmp_path):
    manifest = synthesize(mvtec_category, tmp_path / "real", ["perlin", "cutpaste", "memseg"], 4, masks="real",
                          progress=False)
    real_masks = {str(p) for p in (mvtec_category / "ground_truth" / "crack").iterdir()}
    for entry in manifest["images"]:
        assert entry["region"] in real_masks
        mask = read_mask(tmp_path / "real" / entry["mask"]) > 0
        assert not (mask & ~_resized(entry["region"], mask.shape)).any()
    drawn = tmp_path / "drawn"
    region = np.zeros((48, 64), dtype=np.uint8)
    region[20:40, 30:60] = 255
    save_png(drawn / "expert.png", region)
    manifest = synthesize(mvtec_category, tmp_path / "drawn_out", ["cutpaste_scar", "memseg"], 3, masks=str(drawn),
                          progress=False)
    for entry in manifest["images"]:
        mask = read_mask(tmp_path / "drawn_out" / entry["mask"]) > 0
        assert mask.any() and not (mask & ~(region > 0)).any()


def test_bad_inputs_are_errors_that_name_them(mvtec_category, tmp_path):
    with pytest.raises(FedinspectError, match="unknown method 'gan'"):
        parse_methods("perlin,gan")
    assert parse_methods("offline,perlin") == ("perlin", "cutpaste", "cutpaste_scar", "memseg")
    with pytest.raises(FedinspectError, match="--count"):
        synthesize(mvtec_category, tmp_path / "zero", ["perlin"], 0, progress=False)
    with pytest.raises(WeightsNotFoundError, match="--inpaint-model"):
        run_cli("--data", str(mvtec_category), "--method", "diffusion", "--count", "1", "--out", str(tmp_path / "d"))
    with pytest.raises(DataError, match="--masks"):
        synthesize(mvtec_category, tmp_path / "m", ["perlin"], 1, masks=str(tmp_path / "no_such_folder"),
                   progress=False)
    good = tmp_path / "good_only"
    save_png(good / "train" / "good" / "000.png", np.zeros((32, 32, 3), dtype=np.uint8) + 90)
    save_png(good / "test" / "good" / "000.png", np.zeros((32, 32, 3), dtype=np.uint8) + 90)
    with pytest.raises(DataError, match="no defective test image"):
        synthesize(good, tmp_path / "r", ["perlin"], 1, masks="real", progress=False)
    broken = mvtec_category / "train" / "good" / "001.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"001\.png"):
        synthesize(mvtec_category, tmp_path / "b", ["perlin"], 3, progress=False)
    assert not (tmp_path / "b").exists()  # nothing half-written
    save_png(broken, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"001\.png.*too small"):
        synthesize(mvtec_category, tmp_path / "s", ["perlin"], 3, progress=False)


def test_diffusion_through_the_command_with_a_local_tiny_checkpoint(mvtec_category, tmp_path, one_torch_thread):
    pytest.importorskip("diffusers")
    from .test_synthesis_generators import build_tiny_inpainting_pipeline

    model = build_tiny_inpainting_pipeline(tmp_path / "tiny_model")
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('prompts = ["copper metal scratches"]\nnegative_prompt = "smooth"\nsteps = 2\n'
                       "resolution = 64\n")
    out = tmp_path / "diffusion"
    assert run_cli("--data", str(mvtec_category), "--method", "diffusion", "--count", "2", "--out", str(out),
                   "--inpaint-model", str(model), "--prompts", str(prompts), "--masks", "real", "--device", "cpu") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["methods"]["diffusion"]["steps"] == 2
    assert manifest["methods"]["diffusion"]["pipeline"] == "StableDiffusionInpaintPipeline"
    for entry in manifest["images"]:
        assert entry["prompt"] == "copper metal scratches"
        result = read_image(out / entry["image"])
        source = read_image(mvtec_category / entry["source"])
        mask = read_mask(out / entry["mask"]) > 0
        assert result.shape == source.shape
        np.testing.assert_array_equal(np.any(result != source, axis=2), mask)
        np.testing.assert_array_equal(mask, _resized(entry["region"], mask.shape))
    assert CategoryDataset(out).defect_types == ["diffusion"]
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [")
    with pytest.raises(FedinspectError, match="not valid TOML"):
        run_cli("--data", str(mvtec_category), "--method", "diffusion", "--count", "1", "--out", str(tmp_path / "x"),
                "--inpaint-model", str(model), "--prompts", str(bad))
