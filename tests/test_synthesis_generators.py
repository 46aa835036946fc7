"""Defect generators: each mask is exactly where the image changed, seeded, paper settings respected; the
diffusion path end to end with a tiny randomly initialised Stable Diffusion inpainting pipeline (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedinspect.errors import SettingsError, WeightsNotFoundError
from fedinspect.synthesis import TextureSource, simulate_anomaly
from fedinspect.synthesis.generators import (
    OFFLINE_METHODS,
    CutPasteGenerator,
    MemSegGenerator,
    PerlinGenerator,
    SynthesisError,
    colour_jitter,
    finish,
    make_generator,
    otsu_foreground,
)

from .conftest import textured_image


@pytest.fixture(scope="module")
def textures() -> TextureSource:
    return TextureSource.builtin()


def colour_noise(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    """Random colours: no two pixels alike, so a pasted pixel can be traced to where it came from."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gray_image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return textured_image(np.random.default_rng(seed), height, width)


def changed(result: np.ndarray, source: np.ndarray) -> np.ndarray:
    return np.any(result != source, axis=2)


@pytest.mark.parametrize("method", OFFLINE_METHODS)
@pytest.mark.parametrize("make_image", [colour_noise, gray_image])
def test_mask_is_exactly_where_the_image_changed(method, make_image, textures):
    generator = make_generator(method, textures=textures)
    for seed in range(6):
        source = make_image(seed)
        kept = source.copy()
        result, mask = generator.generate(source, np.random.default_rng(seed))
        assert np.array_equal(source, kept)  # the input is not modified
        assert result.shape == source.shape and result.dtype == np.uint8
        assert mask.shape == source.shape[:2] and mask.dtype == bool
        assert mask.any() and not mask.all()
        np.testing.assert_array_equal(changed(result, source), mask)


@pytest.mark.parametrize("method", OFFLINE_METHODS)
def test_same_seed_same_output_other_seed_other_output(method, textures):
    generator = make_generator(method, textures=textures)
    source = colour_noise(0)
    first = generator.generate(source, np.random.default_rng(7))
    again = generator.generate(source, np.random.default_rng(7))
    other = generator.generate(source, np.random.default_rng(8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("method", OFFLINE_METHODS)
def test_defects_stay_inside_the_region(method, textures):
    generator = make_generator(method, textures=textures)
    region = np.zeros((40, 56), dtype=bool)
    region[10:30, 20:50] = True
    for seed in range(5):
        source = colour_noise(seed)
        result, mask = generator.generate(source, np.random.default_rng(seed), region)
        assert mask.any() and not (mask & ~region).any()
        np.testing.assert_array_equal(changed(result, source), mask)


@pytest.mark.parametrize("method", OFFLINE_METHODS)
def test_a_gray_image_stays_gray(method, textures):
    source = gray_image(3)
    result, _ = make_generator(method, textures=textures).generate(source, np.random.default_rng(3))
    np.testing.assert_array_equal(result[..., 0], result[..., 1])
    np.testing.assert_array_equal(result[..., 0], result[..., 2])


def test_perlin_is_the_draem_detectors_simulate_anomaly(textures):
    """The perlin generator is the draem detector's blend: same pixels for the same random stream."""
    source = colour_noise(5)
    result, mask = PerlinGenerator(textures=textures).generate(source, np.random.default_rng(11))
    expected, expected_mask = simulate_anomaly(source, np.random.default_rng(11), textures)
    np.testing.assert_array_equal(mask, expected_mask)
    # identical except where the blend left a pixel unchanged, which finish() moves by one grey level
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(result[~mask], source[~mask])


def _find_window(source: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (row, col) where ``patch`` occurs in ``source`` pixel for pixel (brute force)."""
    rows, cols = patch.shape[:2]
    return [(y, x) for y in range(source.shape[0] - rows + 1) for x in range(source.shape[1] - cols + 1)
            if np.array_equal(source[y:y + rows, x:x + cols], patch)]


def test_cutpaste_pastes_a_piece_of_the_same_image_elsewhere():
    generator = CutPasteGenerator(jitter=0.0)
    height, width = 40, 56
    for seed in range(8):
        source = colour_noise(100 + seed, height, width)
        result, mask = generator.generate(source, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert mask[y0:y1, x0:x1].all()  # a rectangle
        assert mask.sum() <= 0.15 * height * width + height + width  # area ratio at most 0.15 (+ rounding)
        found = _find_window(source, result[y0:y1, x0:x1])
        assert found and (y0, x0) not in found  # cut from another place of the same image


def test_cutpaste_jitter_changes_the_colours_but_keeps_the_patch_shape():
    source = colour_noise(3)
    result, mask = CutPasteGenerator(jitter=0.1).generate(source, np.random.default_rng(0))
    rows, cols = np.nonzero(mask)
    patch = result[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert not _find_window(source, patch)


def test_cutpaste_scar_is_thin_rotated_and_from_the_image():
    height, width = 64, 64
    for seed in range(8):
        source = colour_noise(200 + seed, height, width)
        result, mask = CutPasteGenerator(scar=True, jitter=0.0).generate(source, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        diagonal = np.hypot(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert diagonal <= np.hypot(16, 25) * np.sqrt(2) + 2  # a 16 x 25 strip at most, rotated
        assert 2 * 10 * 0.5 <= mask.sum() <= 16 * 25 * 1.1  # width 2-16 by length 10-25 (nearest rotation)
        colours = {tuple(p) for p in source.reshape(-1, 3)}
        assert all(tuple(p) in colours for p in result[mask])  # every pasted pixel is one of the image's


def test_colour_jitter_zero_is_identity_and_brightness_scales():
    patch = colour_noise(1, 8, 8)
    np.testing.assert_array_equal(colour_jitter(patch, np.random.default_rng(0), 0.0), patch)
    jittered = colour_jitter(patch, np.random.default_rng(0), 0.5)
    assert jittered.shape == patch.shape and jittered.dtype == np.uint8 and not np.array_equal(jittered, patch)


def test_otsu_foreground_finds_the_object_on_either_background():
    image = np.full((32, 32, 3), 30, dtype=np.uint8)
    image[8:20, 10:24] = 200
    square = np.zeros((32, 32), dtype=bool)
    square[8:20, 10:24] = True
    np.testing.assert_array_equal(otsu_foreground(image), square)
    np.testing.assert_array_equal(otsu_foreground(255 - image), square)  # dark part on a bright background
    assert otsu_foreground(np.full((16, 16, 3), 90, dtype=np.uint8)).all()  # nothing to separate: everything


def test_memseg_draws_on_the_foreground_only(textures):
    image = np.full((48, 48, 3), 20, dtype=np.uint8)
    image[10:38, 12:40] = np.random.default_rng(0).integers(150, 255, (28, 28, 3), dtype=np.uint8)
    foreground = np.zeros((48, 48), dtype=bool)
    foreground[10:38, 12:40] = True
    generator = MemSegGenerator(textures=textures)
    for seed in range(6):
        _, mask = generator.generate(image, np.random.default_rng(seed))
        assert mask.any() and not (mask & ~foreground).any()
    everywhere = MemSegGenerator(textures=textures, foreground="all")
    outside = [everywhere.generate(image, np.random.default_rng(s))[1] & ~foreground for s in range(6)]
    assert any(m.any() for m in outside)


def test_finish_restores_outside_and_nudges_unchanged_inside():
    source = np.full((4, 4, 3), 10, dtype=np.uint8)
    source[0, 0] = 200
    result = np.full((4, 4, 3), 99, dtype=np.uint8)
    result[1, 1] = 10  # inside the mask but equal to the source
    result[0, 0] = 200
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    out, out_mask = finish(source, result, mask)
    np.testing.assert_array_equal(out_mask, mask)
    assert (out[~mask] == source[~mask]).all()
    assert tuple(out[1, 1]) == (11, 11, 11) and tuple(out[0, 0]) == (199, 199, 199) and tuple(out[0, 1]) == (99,) * 3


def test_errors_name_the_problem(textures):
    generator = make_generator("cutpaste")
    with pytest.raises(ValueError, match="uint8 RGB"):
        generator.generate(np.zeros((32, 32), dtype=np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8 RGB"):
        generator.generate(np.zeros((32, 32, 3), dtype=np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="too small"):
        generator.generate(np.zeros((8, 32, 3), dtype=np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match"):
        generator.generate(colour_noise(0), np.random.default_rng(0), np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        generator.generate(colour_noise(0), np.random.default_rng(0), np.zeros((40, 56), dtype=bool))
    with pytest.raises(ValueError, match="unknown synthesis method"):
        make_generator("gan")
    with pytest.raises(ValueError, match="local inpainting model"):
        make_generator("diffusion")
    with pytest.raises(ValueError, match="area_ratio"):
        CutPasteGenerator(area_ratio=(0.2, 0.1))
    with pytest.raises(ValueError, match="foreground"):
        MemSegGenerator(textures=textures, foreground="edges")
    # Perlin noise is 0 at the lattice point (0, 0): a region of that pixel alone never gets a defect
    corner = np.zeros((40, 56), dtype=bool)
    corner[0, 0] = True
    with pytest.raises(SynthesisError, match="no visible defect"):
        PerlinGenerator(textures=textures).generate(colour_noise(0), np.random.default_rng(0), corner)


# --------------------------------------------------------------------------------------------------------------
# diffusion: a tiny randomly initialised pipeline built from configs, saved and loaded like a real checkpoint
# --------------------------------------------------------------------------------------------------------------

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz,"


def build_tiny_inpainting_pipeline(folder: Path) -> Path:
    """A StableDiffusionInpaintPipeline of a few thousand random weights, saved with save_pretrained to
    ``folder`` (a character-level CLIP tokenizer: vocab.json of single characters and an empty merges.txt)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocabulary_dir = folder.parent / f"{folder.name}_vocabulary"
    vocabulary_dir.mkdir(parents=True)
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in TOKEN_CHARS:
        vocabulary[char] = len(vocabulary)
        vocabulary[f"{char}</w>"] = len(vocabulary)
    (vocabulary_dir / "vocab.json").write_text(json.dumps(vocabulary))
    (vocabulary_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocabulary_dir / "vocab.json"), str(vocabulary_dir / "merges.txt"),
                              model_max_length=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(vocabulary), max_position_embeddings=32, projection_dim=16))
    pipeline = StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    return build_tiny_inpainting_pipeline(tmp_path_factory.mktemp("inpaint") / "tiny_sd_inpaint")


@pytest.fixture(scope="module")
def tiny_generator(tiny_model):
    from fedinspect.synthesis.diffusion import DiffusionGenerator, PromptSettings

    prompts = PromptSettings(prompts=("copper metal scratches", "white marks"), steps=2, resolution=64)
    return DiffusionGenerator.from_folder(tiny_model, prompts, device="cpu")


def test_diffusion_changes_pixels_only_inside_the_mask_and_is_reproducible(tiny_generator, one_torch_thread):
    source = colour_noise(9, 64, 64)
    region = np.zeros((64, 64), dtype=bool)
    region[16:40, 20:52] = True
    result, mask = tiny_generator.generate(source, np.random.default_rng(0), region)
    assert result.shape == source.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(mask, region)
    np.testing.assert_array_equal(changed(result, source), mask)
    assert tiny_generator.last_prompt in ("copper metal scratches", "white marks")
    again, _ = tiny_generator.generate(source, np.random.default_rng(0), region)
    other, _ = tiny_generator.generate(source, np.random.default_rng(1), region)
    np.testing.assert_array_equal(result, again)
    assert not np.array_equal(result[region], other[region])


def test_diffusion_keeps_a_non_square_image_and_draws_a_region_without_one(tiny_generator, one_torch_thread):
    source = gray_image(4, 48, 80)
    result, mask = tiny_generator.generate(source, np.random.default_rng(2))
    assert result.shape == source.shape and mask.shape == (48, 80) and mask.any() and not mask.all()
    np.testing.assert_array_equal(changed(result, source), mask)


def test_working_size_keeps_the_aspect_in_multiples():
    from fedinspect.synthesis.diffusion import working_size

    assert working_size((300, 500), 1024, 8) == (616, 1024)  # 300 * 1024 / 500 = 614.4 -> 77 * 8
    assert working_size((48, 80), 64, 2) == (38, 64)
    assert working_size((4, 1000), 512, 8) == (8, 512)


def test_missing_model_says_how_to_provide_one(tmp_path):
    from fedinspect.synthesis.diffusion import DiffusionGenerator

    with pytest.raises(WeightsNotFoundError, match="--inpaint-model"):
        DiffusionGenerator.from_folder(None)
    with pytest.raises(WeightsNotFoundError, match=r"model_index\.json"):
        DiffusionGenerator.from_folder(tmp_path)
    with pytest.raises(WeightsNotFoundError, match=r"model_index\.json"):
        DiffusionGenerator.from_folder(tmp_path / "absent")


def test_prompt_files_are_validated(tmp_path):
    from fedinspect.synthesis.diffusion import load_prompts

    example = load_prompts(Path(__file__).resolve().parents[1] / "examples" / "defect_prompts.toml")
    assert example.prompts == ("white marks on the wall", "copper metal scratches")
    assert example.negative_prompt == "smooth, plain, black, dark, shadow"
    cases = {
        "prompts = [\n": "not valid TOML",
        'prompt = "scratch"\n': "unknown key",
        "steps = 0\n": "steps must be",
        'steps = "ten"\n': "steps has the wrong type",
        "prompts = []\n": "non-empty list",
        "strength = 1.5\n": "strength must be",
        "guidance_scale = true\n": "guidance_scale has the wrong type",
    }
    for text, message in cases.items():
        path = tmp_path / "prompts.toml"
        path.write_text(text)
        with pytest.raises(SettingsError, match=message):
            load_prompts(path)
    with pytest.raises(SettingsError, match="not found"):
        load_prompts(tmp_path / "absent.toml")
    one = tmp_path / "one.toml"
    one.write_text('prompts = "a dent"\nsteps = 4\n')
    assert load_prompts(one).prompts == ("a dent",) and load_prompts(one).steps == 4
