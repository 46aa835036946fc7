"""Text-guided defect inpainting with a local diffusion checkpoint (DIAG, Capogrosso et al., Ital-IA 2024).

A domain expert describes the defect in words (a prompt, a negative prompt) and marks where it may appear
(a mask); a Stable Diffusion inpainting pipeline of ``diffusers`` paints it into a good image, training-free.
The seed used SDXL inpainting; any SD inpainting checkpoint saved with ``save_pretrained`` works. Weights
are read from a local folder only (``local_files_only=True``): nothing is downloaded, and none ship with
fedinspect. The pipeline's output is blended back so that every pixel outside the mask is exactly the
original's (the VAE round trip changes the whole image otherwise).

``diffusers``, ``transformers`` and torch are imported when a pipeline is loaded, never at import time.
The prompts come from a small TOML file (``examples/defect_prompts.toml``)::

    prompts = ["white marks on the wall", "copper metal scratches"]
    negative_prompt = "smooth, plain, black, dark, shadow"
    guidance_scale = 7.5
    steps = 30
    strength = 0.99
    # resolution = 1024   # long side the pipeline works at (default: the checkpoint's native size)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedinspect.errors import FedinspectError, SettingsError, WeightsNotFoundError
from fedinspect.synthesis.generators import MIN_SIDE, check_image, finish
from fedinspect.synthesis.perlin import perlin_mask

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NO_WEIGHTS = (
    "the diffusion method needs a local inpainting checkpoint and none ships with fedinspect (no download "
    "happens offline). On a machine with internet: `from diffusers import AutoPipelineForInpainting; "
    "AutoPipelineForInpainting.from_pretrained('diffusers/stable-diffusion-xl-1.0-inpainting-0.1')"
    ".save_pretrained('DIR')` (or any Stable Diffusion inpainting checkpoint), copy DIR here and pass "
    "--inpaint-model DIR"
)


@dataclass(frozen=True)
class PromptSettings:
    """What the expert edits: prompts (one drawn per image), negative prompt and sampler settings.

    Defaults are the seed's prompts; the seed does not give guidance, steps or strength, so these are
    diffusers' usual inpainting values (fewer steps: 30 instead of 50).
    """

    prompts: tuple[str, ...] = ("white marks on the wall", "copper metal scratches")
    negative_prompt: str = "smooth, plain, black, dark, shadow"
    guidance_scale: float = 7.5
    steps: int = 30
    strength: float = 0.99
    resolution: int | None = None

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise SettingsError("prompts must be a non-empty list of non-empty strings")
        if not isinstance(self.negative_prompt, str):
            raise SettingsError("negative_prompt must be a string")
        if not 0 <= self.guidance_scale <= 50:
            raise SettingsError(f"guidance_scale must be in [0, 50], got {self.guidance_scale}")
        if not 1 <= self.steps <= 1000:
            raise SettingsError(f"steps must be in 1..1000, got {self.steps}")
        if not 0 < self.strength <= 1:
            raise SettingsError(f"strength must be in (0, 1], got {self.strength}")
        if self.resolution is not None and not 32 <= self.resolution <= 4096:
            raise SettingsError(f"resolution must be in 32..4096 pixels, got {self.resolution}")

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale, "steps": self.steps, "strength": self.strength,
                "resolution": self.resolution}


_KEY_TYPES: dict[str, tuple[type, ...]] = {"prompts": (list, str), "negative_prompt": (str,),
                                          "guidance_scale": (int, float), "steps": (int,),
                                          "strength": (int, float), "resolution": (int,)}


def load_prompts(path: str | Path) -> PromptSettings:
    """Read and validate a prompts TOML file; a SettingsError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: prompts file not found")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"{path}: not valid TOML ({error})") from error
    unknown = sorted(set(values) - set(_KEY_TYPES))
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEY_TYPES)}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, _KEY_TYPES[key]):
            raise SettingsError(f"{path}: {key} has the wrong type ({type(value).__name__})")
    if isinstance(values.get("prompts"), str):
        values["prompts"] = [values["prompts"]]
    if "prompts" in values:
        values["prompts"] = tuple(values["prompts"])
    try:
        return PromptSettings(**values)
    except SettingsError as error:
        raise SettingsError(f"{path}: {error}") from error


def load_inpaint_pipeline(model_dir: str | Path | None, device: str = "cpu") -> Any:
    """A diffusers inpainting pipeline from a local folder (``model_index.json`` inside), on ``device``.

    Raises WeightsNotFoundError saying how to provide weights when ``model_dir`` is None or not a pipeline
    folder; loading never touches the network.
    """
    if model_dir is None:
        raise WeightsNotFoundError(NO_WEIGHTS)
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise WeightsNotFoundError(f"{model_dir}: not a diffusers pipeline folder (no model_index.json); "
                                   f"{NO_WEIGHTS}")
    import torch
    from diffusers import AutoPipelineForInpainting
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    # half precision on a GPU (as the checkpoints are published); the default float32 on the CPU
    options = {"torch_dtype": torch.float16} if device.startswith("cuda") else {}
    try:
        pipeline = AutoPipelineForInpainting.from_pretrained(model_dir, local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as error:
        raise WeightsNotFoundError(f"{model_dir}: could not load an inpainting pipeline ({error})") from error
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def working_size(shape: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the long side ``resolution``, each a multiple of ``multiple`` (at least one)."""
    height, width = shape
    scale = resolution / max(height, width)
    return (max(multiple, int(np.rint(height * scale / multiple)) * multiple),
            max(multiple, int(np.rint(width * scale / multiple)) * multiple))


@dataclass
class DiffusionGenerator:
    """DIAG's defect synthesis: inpaint ``region`` of a good image from a prompt (Capogrosso et al. 2024).

    ``region`` is the expert's mask (a real defect's mask, as the seed, or a drawn one); without one a
    Perlin-noise region is drawn. The image is resized to the working resolution, inpainted, resized back
    and blended: outside the mask the result is the original, bit for bit.
    """

    pipeline: Any
    prompts: PromptSettings = field(default_factory=PromptSettings)
    device: str = "cpu"
    model_dir: str | None = None
    name: str = field(default="diffusion", init=False)
    last_prompt: str | None = field(default=None, init=False)
    """The prompt of the latest :meth:`generate` (the manifest records it per image)."""

    @classmethod
    def from_folder(cls, model_dir: str | Path | None, prompts: PromptSettings | None = None,
                    device: str = "cpu") -> DiffusionGenerator:
        """Load the pipeline of ``model_dir`` (see :func:`load_inpaint_pipeline`)."""
        pipeline = load_inpaint_pipeline(model_dir, device)
        return cls(pipeline, prompts or PromptSettings(), device, str(model_dir))

    def parameters(self) -> dict[str, Any]:
        return {**self.prompts.as_dict(), "model": self.model_dir,
                "pipeline": type(self.pipeline).__name__, "paper": "Capogrosso et al., DIAG, Ital-IA 2024"}

    def _resolution(self) -> tuple[int, int]:
        multiple = int(getattr(self.pipeline, "vae_scale_factor", 8))
        if self.prompts.resolution is not None:
            return self.prompts.resolution, multiple
        sample_size = getattr(getattr(self.pipeline, "unet", None), "config", None)
        native = getattr(sample_size, "sample_size", 64) if sample_size is not None else 64
        return int(native) * multiple, multiple

    def generate(self, image: np.ndarray, rng: np.random.Generator,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        image, region = check_image(image, region)
        shape = image.shape[:2]
        for _ in range(10):
            if region is not None:
                break
            drawn = perlin_mask(shape, rng, min_scale=1, max_scale=4)
            region = drawn if drawn.any() else None
        if region is None:
            raise FedinspectError("diffusion: could not draw a non-empty region")
        prompt = self.prompts.prompts[int(rng.integers(len(self.prompts.prompts)))]
        seed = int(rng.integers(2**63 - 1))
        resolution, multiple = self._resolution()
        height, width = working_size(shape, resolution, multiple)
        source = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
        mask_image = Image.fromarray((region * 255).astype(np.uint8)).resize((width, height),
                                                                           Image.Resampling.NEAREST)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.inference_mode():
            output = self.pipeline(
                prompt=prompt, negative_prompt=self.prompts.negative_prompt or None, image=source,
                mask_image=mask_image, height=height, width=width, guidance_scale=self.prompts.guidance_scale,
                num_inference_steps=self.prompts.steps, strength=self.prompts.strength, generator=generator,
                output_type="np",
            )
        painted = np.clip(np.asarray(output.images[0], dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if painted.shape[:2] != shape:
            painted = np.asarray(Image.fromarray(painted).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
        result, mask = finish(image, painted, region)
        self.last_prompt = prompt
        return result, mask


__all__ = ["MIN_SIDE", "NO_WEIGHTS", "DiffusionGenerator", "PromptSettings", "load_inpaint_pipeline",
           "load_prompts", "working_size"]
