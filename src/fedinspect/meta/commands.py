"""The ``meta-study`` subcommand: seed 002's experiments (MAML few-shot defect detection) as one resumable command.

``fedinspect meta-study --data DIR [DIR ...] --out OUT [--shots all,20]`` leaves every product task out in turn,
meta-trains on the others, fine-tunes on it and writes the seed's Tables 2-5 and Grad-CAM figures
(:mod:`fedinspect.meta.study`). Importing this module is cheap (no numpy, no torch): the work is imported when it
runs; the choices below are spelled out for that reason (a test checks them against the modules).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedinspect.errors import FedinspectError
from fedinspect.options import split_list

EXPERIMENT_CHOICES = ("init", "placement", "ablation")  # fedinspect.meta.study.EXPERIMENTS
BACKBONE_CHOICES = ("conv4", "efficientnet_lite0")  # fedinspect.meta.model.BACKBONES
REFERENCE_CHOICES = ("random", "nearest", "mean")  # fedinspect.meta.tasks.REFERENCE_RULES


def parse_shots(value: str | list[str]) -> tuple[int | None, ...]:
    """``--shots``: a comma list of ``all`` and image counts, e.g. ``all,20``."""
    shots: list[int | None] = []
    for item in split_list(value, "--shots"):
        if item == "all":
            shots.append(None)
            continue
        try:
            shots.append(int(item))
        except ValueError:
            raise FedinspectError(f"--shots: {item!r} is neither 'all' nor a number of images") from None
    if not shots:
        raise FedinspectError("--shots: give 'all', a number of images, or both (all,20)")
    return tuple(shots)


def _patience(value: int) -> int | None:
    return None if value == 0 else value


def cmd_meta_study(args: argparse.Namespace) -> int:
    """``fedinspect meta-study``: parse the options, run :func:`~fedinspect.meta.study.run_meta_study`, print."""
    from fedinspect.meta.study import MetaStudySettings, run_meta_study

    data = list(args.data or [])
    if args.tasks:
        data.append(args.tasks)
    if not data:
        raise FedinspectError("meta-study: give --data (folders of tasks) or --tasks (a TOML task list), or both")
    experiments = split_list(args.experiments, "--experiments")
    unknown = [name for name in experiments if name not in EXPERIMENT_CHOICES]
    if unknown or not experiments:
        raise FedinspectError(f"--experiments: unknown {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(EXPERIMENT_CHOICES)}")
    settings = MetaStudySettings(
        experiments=experiments, shots=parse_shots(args.shots), image_size=args.image_size, backbone=args.backbone,
        width=args.width, reference=args.reference, meta_steps=args.meta_steps, meta_batch=args.meta_batch,
        n_support=args.support, n_query=args.query, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
        outer_lr=args.outer_lr, first_order=not args.second_order, meta_patience=_patience(args.meta_patience),
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=_patience(args.patience),
        validation_fraction=args.validation_fraction, gradcam_images=args.gradcam_images, seed=args.seed)
    summary = run_meta_study(data, args.out, settings, progress=not getattr(args, "quiet", False))
    report = (Path(args.out) / "report.md").read_text(encoding="utf-8")
    print(report.split("## Cost")[0].rstrip())
    print(f"{summary['cells_run']} cells run, {summary['cells_reused']} reused in {summary['wall_s']:.0f} s; "
          f"results.json, report.md, report.html and gradcam/ in {args.out}")
    return 0


def add_meta_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``meta-study`` to the ``fedinspect`` subcommands."""
    from fedinspect.options import HelpFormatter

    parser = commands.add_parser("meta-study", help="meta-learned few-shot defect detection (MAML, Siamese "
                                                    "difference, coordinate attention): leave one product out, "
                                                    "meta-train on the others, adapt (MeDetection's tables)",
                                 formatter_class=HelpFormatter)
    parser.add_argument("--data", nargs="+", default=None,
                        help="task folders: categories (MVTec or AutoVI layout), folders of labelled images (good/ "
                             "and one subfolder per defect type), or datasets holding them; every task is left out "
                             "once")
    parser.add_argument("--tasks", default=None,
                        help="TOML task list ([[task]] name, path, kind = mvtec or folder) adding your own products")
    parser.add_argument("--out", required=True,
                        help="study folder; finished cells in it are not redone (other settings are refused)")
    parser.add_argument("--experiments", nargs="+", default=",".join(EXPERIMENT_CHOICES),
                        help="comma-separated: init (MAML / random / ImageNet initialisation), placement (coordinate "
                             "attention low / high / both / none), ablation (without Siamese difference, without CA)")
    parser.add_argument("--shots", nargs="+", default="all",
                        help="images of the left-out task's training share to fine-tune on, comma-separated: all, "
                             "a number, or both (all,20)")
    parser.add_argument("--image-size", type=int, default=64, help="images are resized to this square (px)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, episodes, initial weights, batches")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONE_CHOICES, default="conv4",
                       help="conv4 (4Conv from scratch) or efficientnet_lite0 (frozen pretrained stem) for the MAML "
                            "and random variants; the ImageNet variant always uses efficientnet_lite0")
    model.add_argument("--width", type=int, default=32, help="channels of the trainable conv blocks")
    model.add_argument("--reference", choices=REFERENCE_CHOICES, default="nearest",
                       help="which good image each test image is compared with (nearest in a 16x16 thumbnail, a "
                            "random one, or the mean image)")
    meta = parser.add_argument_group("meta-training (MAML)")
    meta.add_argument("--meta-steps", type=int, default=60, help="most meta-steps (outer Adam updates)")
    meta.add_argument("--meta-batch", type=int, default=4, help="tasks drawn per meta-step")
    meta.add_argument("--support", type=int, default=64, help="support pairs per task and meta-step")
    meta.add_argument("--query", type=int, default=20, help="query pairs per task and meta-step")
    meta.add_argument("--inner-steps", type=int, default=1, help="SGD steps of the inner loop")
    meta.add_argument("--inner-lr", type=float, default=1e-5, help="inner-loop learning rate (alpha)")
    meta.add_argument("--outer-lr", type=float, default=1e-3, help="outer-loop learning rate (beta, Adam)")
    meta.add_argument("--second-order", action="store_true",
                      help="differentiate through the inner loop (about 3x slower than first order)")
    meta.add_argument("--meta-patience", type=int, default=20,
                      help="meta-steps without a lower query loss before stopping (0: never stop early)")
    tune = parser.add_argument_group("fine-tuning on the left-out task")
    tune.add_argument("--epochs", type=int, default=30, help="most fine-tuning epochs")
    tune.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    tune.add_argument("--batch-size", type=int, default=64, help="pairs per fine-tuning step")
    tune.add_argument("--patience", type=int, default=8,
                      help="epochs without a lower validation loss before stopping (0: never stop early)")
    tune.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of the fine-tuning images held for early stopping")
    tune.add_argument("--gradcam-images", type=int, default=3, help="defective test images per task in the Grad-CAM "
                                                                     "figures (0: none)")
    parser.set_defaults(run=cmd_meta_study)
