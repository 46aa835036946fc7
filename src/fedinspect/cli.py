"""The ``fedinspect`` command line. Every command is a thin layer over a Python function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedinspect import __version__
from fedinspect.errors import FedinspectError


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PatchCore")
    group.add_argument("--backbone", default="efficientnet_lite0",
                       help="feature extractor (efficientnet_lite0, efficientnet_lite2, wide_resnet50_2)")
    group.add_argument("--weights", default=None, help="local weights file for the backbone")
    group.add_argument("--image-size", type=int, default=256, help="short side after resizing (px)")
    group.add_argument("--coreset-ratio", type=float, default=0.1, help="fraction of patches kept")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice")


def _model_params(args: argparse.Namespace) -> dict:
    return {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "coreset_ratio": args.coreset_ratio,
        "seed": args.seed,
    }


def _cmd_synth(args: argparse.Namespace) -> int:
    from fedinspect.data.synthetic import generate_dataset

    start = time.perf_counter()
    out = generate_dataset(args.out, seed=args.seed, size=args.size, progress=not args.quiet)
    print(f"synthetic dataset ({args.size}, seed {args.seed}) in {out} [{time.perf_counter() - start:.1f} s]")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from fedinspect.pipeline import fit_category, peak_memory_mb

    model = fit_category(args.data, args.out, progress=not args.quiet, **_model_params(args))
    print(
        f"fitted {Path(args.data).name}: {model.n_train_images_} images, {model.n_train_patches_} patches "
        f"-> memory bank {model.memory_bank_.shape[0]} x {model.memory_bank_.shape[1]} "
        f"in {model.fit_seconds_:.1f} s (peak memory {peak_memory_mb():.0f} MiB); saved to {args.out}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedinspect.evaluation.summary import results_table
    from fedinspect.pipeline import evaluate_category

    results = evaluate_category(args.model, args.data, args.out, progress=not args.quiet)
    print(results_table({results["category"]: results}))
    print(f"results and 16-bit anomaly maps in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedinspect.data.dataset import find_categories
    from fedinspect.data.synthetic import generate_dataset
    from fedinspect.evaluation.summary import results_table
    from fedinspect.pipeline import evaluate_category, fit_category

    out = Path(args.out)
    data = generate_dataset(out / "data", seed=args.seed, size=args.size, progress=not args.quiet)
    per_category = {}
    start = time.perf_counter()
    for category_dir in find_categories(data):
        name = category_dir.name
        print(f"== {name}", file=sys.stderr)
        model = fit_category(category_dir, out / "models" / name, progress=not args.quiet, **_model_params(args))
        per_category[name] = evaluate_category(model, category_dir, out / "results" / name,
                                               progress=not args.quiet)
        per_category[name]["timings"]["fit_s"] = model.fit_seconds_
    table = results_table(per_category)
    summary = {"categories": per_category, "total_seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nPatchCore on the synthetic '{args.size}' dataset, {summary['total_seconds']:.0f} s; "
          f"details in {out}/summary.json, maps in {out}/results/<category>/maps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedinspect", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedinspect {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate the synthetic dataset in the AutoVI layout")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    synth.set_defaults(run=_cmd_synth)

    fit = commands.add_parser("fit", help="fit PatchCore on one category's good training images")
    fit.add_argument("--data", required=True, help="category folder (AutoVI or MVTec AD layout)")
    fit.add_argument("--out", required=True, help="model folder to write")
    _add_model_options(fit)
    fit.set_defaults(run=_cmd_fit)

    evaluate = commands.add_parser("evaluate", help="score a category's test split (AutoVI protocol)")
    evaluate.add_argument("--model", required=True, help="model folder written by 'fit'")
    evaluate.add_argument("--data", required=True, help="category folder")
    evaluate.add_argument("--out", required=True, help="results folder (results.json, maps/)")
    evaluate.set_defaults(run=_cmd_evaluate)

    demo = commands.add_parser("demo", help="generate synthetic data, fit and evaluate every category")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    _add_model_options(demo)
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FedinspectError as error:
        print(f"fedinspect: error: {error}", file=sys.stderr)
        return 2
