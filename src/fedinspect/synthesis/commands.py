"""The ``synthesize`` subcommand: synthetic defects drawn into a category's good images, in the MVTec layout.

``fedinspect synthesize --data CATEGORY --method perlin,cutpaste --count 100 --out OUT`` writes::

    OUT/train/good/<source>.png                     the good images the defects were drawn into (PNG copies)
    OUT/test/<method>/<index>_<source>.png          one defective image per draw
    OUT/ground_truth/<method>/<index>_<source>_mask.png   its mask (255 exactly where the image changed)
    OUT/manifest.json                               method settings, seed, source of every image
    OUT/synthesis_grid.png                          real good images, real defects, each method's results

so ``CategoryDataset(OUT)`` reads it (each method is a defect type) and every other command takes it as
``--data``. The folder is written atomically (staged beside it, moved into place at the end) and an existing,
non-empty ``OUT`` is refused, a previous synthesis run included: nothing is ever overwritten.

Importing this module is cheap (no numpy, no torch, no diffusers): the work is imported when it runs.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

from fedinspect.errors import FedinspectError
from fedinspect.options import split_list

MANIFEST = "manifest.json"
GRID = "synthesis_grid.png"
FORMAT = "fedinspect-synthesis/1"
GRID_COLUMNS = 5
MASK_SOURCES = ("generated", "real")


def parse_methods(value: str | list[str]) -> tuple[str, ...]:
    """The comma list of ``--method`` (``offline``: every generator that needs no weights), checked."""
    from fedinspect.synthesis.generators import METHODS, OFFLINE_METHODS

    methods: list[str] = []
    for name in split_list(value, "--method"):
        for method in OFFLINE_METHODS if name == "offline" else (name,):
            if method not in METHODS:
                raise FedinspectError(f"--method: unknown method {method!r}; choose from "
                                      f"{', '.join(METHODS)} or offline")
            if method not in methods:
                methods.append(method)
    if not methods:
        raise FedinspectError("--method: no method given")
    return tuple(methods)


def _method_seed(method: str) -> int:
    """A fixed number per method, so that adding a method to a run does not change another's images."""
    from fedinspect.synthesis.generators import METHODS

    return METHODS.index(method)


class RegionSource:
    """Where defects may appear: ``generated`` (each generator draws its own), ``real`` (the category's
    ground-truth masks) or a folder of masks an expert drew (any non-zero pixel is allowed)."""

    def __init__(self, spec: str, dataset: Any) -> None:
        from fedinspect.data.images import list_images
        from fedinspect.errors import DataError

        self.spec = spec
        self.paths: list[Path] = []
        if spec == "generated":
            return
        if spec == "real":
            self.paths = [path for sample in dataset.test if sample.label for path in sample.ground_truth]
            if not self.paths:
                raise DataError(dataset.root, "--masks real: the category has no defective test image with a "
                                              "ground-truth mask; draw masks into a folder and pass --masks DIR")
            return
        folder = Path(spec)
        if not folder.is_dir():
            raise DataError(folder, f"--masks: not 'generated', 'real' or a folder of masks ({MASK_SOURCES})")
        self.paths = list_images(folder)
        if not self.paths:
            raise DataError(folder, "--masks: the mask folder holds no image")

    def draw(self, shape: tuple[int, int], rng: Any) -> tuple[Any, str | None]:
        """(a boolean region of ``shape`` or None, the mask file it came from) for one defect."""
        import numpy as np
        from PIL import Image

        from fedinspect.data.images import read_mask
        from fedinspect.errors import DataError

        if not self.paths:
            return None, None
        for _ in range(20):
            path = self.paths[int(rng.integers(len(self.paths)))]
            mask = read_mask(path)
            mask = (mask.max(axis=2) if mask.ndim == 3 else mask) != 0
            if mask.shape != shape:
                resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]),
                                                                              Image.Resampling.NEAREST)
                mask = np.asarray(resized) > 0
            if mask.any():
                return mask, str(path)
        raise DataError(path, "--masks: 20 masks drawn in a row were empty at the image's size")


def _check_out(out: Path) -> None:
    """Refuse an existing non-empty ``out``: a previous synthesis run or anything else (nothing is replaced)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if (out / MANIFEST).is_file():
            raise FedinspectError(f"{out}: holds a previous synthesis run ({MANIFEST}); synthesize never "
                                  "overwrites one: remove the folder or choose another --out")
        raise FedinspectError(f"{out}: exists and is not empty; choose another --out")


def build_generators(methods: tuple[str, ...], texture_dir: str | None = None, inpaint_model: str | None = None,
                     prompts: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """One generator per method; the diffusion pipeline is loaded (and its absence reported) before any work."""
    from fedinspect.synthesis.generators import make_generator
    from fedinspect.synthesis.textures import TextureSource

    generators: dict[str, Any] = {}
    if "diffusion" in methods:
        from fedinspect.synthesis.diffusion import DiffusionGenerator, load_prompts

        settings = load_prompts(prompts) if prompts else None
        generators["diffusion"] = DiffusionGenerator.from_folder(inpaint_model, settings, device)
    textures = None
    if {"perlin", "memseg"} & set(methods):
        textures = TextureSource.from_folder(texture_dir) if texture_dir else TextureSource.builtin()
    for method in methods:
        if method != "diffusion":
            generators[method] = make_generator(method, textures=textures, texture_dir=texture_dir)
    return {method: generators[method] for method in methods}


def synthesize(data: str | Path, out: str | Path, methods: tuple[str, ...] | list[str], count: int, seed: int = 0,
               texture_dir: str | None = None, inpaint_model: str | None = None, prompts: str | None = None,
               masks: str = "generated", device: str = "cpu", progress: bool = True,
               generators: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw ``count`` defects per method into ``data``'s good training images; write ``out``; return the manifest.

    Source images are a seeded permutation of ``train/good`` (cycled when ``count`` exceeds them), the same for
    every method; image ``i`` of a method uses ``numpy.random.default_rng([seed, method number, i])``, so a run
    is reproducible and adding a method leaves the others' images unchanged. ``generators`` overrides the ones
    built from the options (tests pass a tiny diffusion pipeline this way).
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.data.images import read_image
    from fedinspect.errors import DataError
    from fedinspect.run_folder import staged_output
    from fedinspect.synthesis.generators import SynthesisError, check_image

    methods = tuple(methods)
    if count < 1:
        raise FedinspectError(f"--count must be at least 1, got {count}")
    data, out = Path(data), Path(out)
    _check_out(out)
    dataset = CategoryDataset(data)
    regions = RegionSource(masks, dataset)
    if generators is None:
        generators = build_generators(methods, texture_dir, inpaint_model, prompts, device)
    goods = [sample.image_path for sample in dataset.train]
    order = np.random.default_rng([seed]).permutation(len(goods))
    sources = [goods[int(order[i % len(goods)])] for i in range(count)]
    images: dict[Path, Any] = {}
    entries: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    with staged_output(out, inputs=[data]) as staging:
        bar = tqdm(total=count * len(methods), desc="synthesize", unit="img", disable=not progress)
        for method in methods:
            generator = generators[method]
            for folder in ("test", "ground_truth"):
                (staging / folder / method).mkdir(parents=True)
            start = time.perf_counter()
            for index, source in enumerate(sources):
                if source not in images:
                    image = read_image(source)
                    try:
                        check_image(image)
                    except ValueError as error:
                        raise DataError(source, str(error)) from error
                    images[source] = image
                image = images[source]
                rng = np.random.default_rng([seed, _method_seed(method), index])
                region, region_file = regions.draw(image.shape[:2], rng)
                try:
                    result, mask = generator.generate(image, rng, region)
                except (SynthesisError, ValueError) as error:
                    raise DataError(source, f"{method}: {error}") from error
                if not mask.any():
                    raise DataError(source, f"{method}: the generator left the image unchanged")
                stem = f"{index:04d}_{source.stem}"
                image_file = Path("test") / method / f"{stem}.png"
                mask_file = Path("ground_truth") / method / f"{stem}_mask.png"
                Image.fromarray(result).save(staging / image_file)
                Image.fromarray(mask.astype(np.uint8) * 255).save(staging / mask_file)
                entry = {"method": method, "image": image_file.as_posix(), "mask": mask_file.as_posix(),
                         "source": source.relative_to(data).as_posix(), "region": region_file or masks,
                         "defect_pixels": int(mask.sum())}
                if getattr(generator, "last_prompt", None):
                    entry["prompt"] = generator.last_prompt
                entries.append(entry)
                bar.update()
            timing[method] = round(time.perf_counter() - start, 3)
        bar.close()
        good_dir = staging / "train" / "good"
        good_dir.mkdir(parents=True)
        for source, image in images.items():
            Image.fromarray(image).save(good_dir / f"{source.stem}.png")
        manifest = {"format": FORMAT, "data": str(data.resolve()), "category": dataset.name, "seed": seed,
                    "count": count, "masks": masks, "texture_dir": texture_dir,
                    "methods": {method: generators[method].parameters() for method in methods},
                    "seconds": timing, "images": entries}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        plot_synthesis_grid(dataset, staging, entries, staging / GRID, columns=GRID_COLUMNS)
    return manifest


def plot_synthesis_grid(dataset: Any, root: Path, entries: list[dict[str, Any]], path: Path,
                        columns: int = GRID_COLUMNS) -> Path:
    """The seed's Fig. 2: rows of real good images, real defects (if any) and each method's results.

    Real defects and synthetic ones carry their mask's outline (red). ``root`` is the synthesis folder that
    ``entries`` (manifest rows) are relative to.
    """
    import numpy as np
    from matplotlib.figure import Figure

    from fedinspect.data.images import read_image, read_mask
    from fedinspect.evaluation.plots import _gt_contour, _save, _show_image

    def mask_of(files: Any) -> Any:
        masks = [read_mask(file) for file in files]
        masks = [(m.max(axis=2) if m.ndim == 3 else m) != 0 for m in masks]
        return np.logical_or.reduce(masks) if masks else None

    rows: list[tuple[str, list[tuple[Any, Any, str]]]] = []
    goods = dataset.train[:columns]
    rows.append(("real good", [(read_image(s.image_path), None, s.stem) for s in goods]))
    by_type: dict[str, list[Any]] = {}
    for sample in dataset.test:
        if sample.label:
            by_type.setdefault(sample.defect, []).append(sample)
    defects = [s for group in zip_longest(*by_type.values()) for s in group if s is not None][:columns]
    if defects:
        rows.append(("real defects", [(read_image(s.image_path), mask_of(s.ground_truth), f"{s.defect}/{s.stem}")
                                      for s in defects]))
    for method in dict.fromkeys(entry["method"] for entry in entries):
        shown = [entry for entry in entries if entry["method"] == method][:columns]
        rows.append((method, [(read_image(root / e["image"]), mask_of([root / e["mask"]]),
                               Path(e["image"]).stem) for e in shown]))
    width = 2.4
    fig = Figure(figsize=(columns * width + 0.8, len(rows) * width * 0.8 + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row_axes, (label, cells) in zip(axes, rows, strict=True):
        for column, ax in enumerate(row_axes):
            if column >= len(cells):
                ax.set_visible(False)
                continue
            image, mask, name = cells[column]
            height, image_width = _show_image(ax, image)
            if mask is not None:
                _gt_contour(ax, mask, height, image_width, "#ff2020")
            ax.set_xlim(0, image_width)
            ax.set_ylim(height, 0)
            ax.set_title(name if len(name) <= 28 else f"{name[:25]}...", fontsize=7)
        row_axes[0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"{dataset.name}: real images and synthetic defects (red: mask outline)", fontsize=10)
    return _save(fig, path)


def cmd_synthesize(args: argparse.Namespace) -> int:
    """``fedinspect synthesize``: parse the options, run :func:`synthesize`, print where the results are."""
    methods = parse_methods(args.method)
    device = args.device
    if device == "auto":
        device = "cpu"
        if "diffusion" in methods:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = synthesize(args.data, args.out, methods, args.count, seed=args.seed, texture_dir=args.texture_dir,
                          inpaint_model=args.inpaint_model, prompts=args.prompts, masks=args.masks, device=device,
                          progress=not getattr(args, "quiet", False))
    for method in methods:
        print(f"{method}: {args.count} images in {manifest['seconds'][method]:.1f} s")
    print(f"images, masks, {MANIFEST} and {GRID} in {args.out} (MVTec layout: each method is a defect type)")
    return 0


def add_synthesis_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``synthesize`` to the ``fedinspect`` subcommands."""
    from fedinspect.options import HelpFormatter

    parser = commands.add_parser("synthesize", help="draw synthetic defects into a category's good images "
                                                    "(DRAEM, CutPaste, MemSeg, diffusion inpainting)",
                                 formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="category folder (AutoVI or MVTec AD layout); defects are "
                                                      "drawn into its train/good images")
    parser.add_argument("--method", required=True,
                        help="methods, comma-separated: perlin, cutpaste, cutpaste_scar, memseg, diffusion "
                             "(offline: the four that need no weights)")
    parser.add_argument("--count", type=int, required=True, help="defective images per method")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the source images, regions and defects")
    parser.add_argument("--masks", default="generated",
                        help="where defects may appear: generated (each method draws its own region), real (the "
                             "category's ground-truth masks, as the seed), or a folder of drawn masks")
    parser.add_argument("--texture-dir", default=None,
                        help="folder of texture images for perlin and memseg, e.g. a DTD copy (none: textures "
                             "shipped with scikit-image and generated ones)")
    diffusion = parser.add_argument_group("diffusion (a local inpainting checkpoint; none ships offline)")
    diffusion.add_argument("--inpaint-model", default=None,
                           help="diffusers pipeline folder of an inpainting checkpoint (save_pretrained output)")
    diffusion.add_argument("--prompts", default=None,
                           help="TOML file of prompts, negative prompt, guidance_scale, steps, strength (see "
                                "examples/defect_prompts.toml; none: the seed's prompts)")
    diffusion.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                           help="where the pipeline runs (auto: CUDA when torch sees a GPU)")
    parser.set_defaults(run=cmd_synthesize)
