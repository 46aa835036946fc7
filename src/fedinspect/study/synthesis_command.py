"""The ``synthesis-study`` subcommand (seed 003's Tables 1-2); importing it loads no numpy or torch."""

from __future__ import annotations

import argparse

from fedinspect.options import split_list


def parse_study_methods(value: str) -> tuple[str, ...]:
    from fedinspect.study.synthesis import DEFAULT_METHODS

    methods: list[str] = []
    for name in split_list(value, "--methods"):
        for method in DEFAULT_METHODS if name == "offline" else (name,):
            if method not in methods:
                methods.append(method)
    return tuple(methods)


def cmd_synthesis_study(args: argparse.Namespace) -> int:
    """``fedinspect synthesis-study``: build the settings, run the study, print the tables' file names."""
    from fedinspect.study.synthesis import SynthesisStudySettings, run_synthesis_study

    counts = split_list(args.counts, "--counts", int)
    settings = SynthesisStudySettings(
        methods=parse_study_methods(args.methods), counts=counts, seed=args.seed, epochs=args.epochs,
        image_size=args.image_size, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        validation_fraction=args.validation_fraction, backbone=args.backbone, weights=args.weights,
        real_fraction=args.real_fraction, masks=args.masks, texture_dir=args.texture_dir,
        inpaint_model=args.inpaint_model, prompts=args.prompts, patchcore=not args.no_patchcore,
        cam_examples=args.cam_examples)
    results = run_synthesis_study(args.data, args.out, settings, progress=not getattr(args, "quiet", False),
                                  threads=args.threads)
    for key in ("zero_shot", "full_shot"):
        for row in results["tables"][key]:
            print(f"{key:9s} {row['model']:34s} N_aug {row['n_aug']:4d}  AP {row['ap']:.3f}  "
                  f"P {row['precision']:.3f}  R {row['recall']:.3f}")
    print(f"tables in {args.out}/report.md and results.json")
    return 0


def add_synthesis_study_command(commands: argparse._SubParsersAction) -> None:
    """Add ``synthesis-study`` to the ``fedinspect`` subcommands."""
    from fedinspect.options import HelpFormatter

    parser = commands.add_parser(
        "synthesis-study", formatter_class=HelpFormatter,
        help="seed 003's experiment: a supervised detector trained on synthetic defects, zero-shot and full-shot, "
             "against PatchCore and real defects alone",
        description="Zero-shot (good + synthetic defects) and full-shot (good + real + synthetic defects) training "
                    "of the supervised detector for every method and count, the no-synthesis baseline and "
                    "PatchCore, scored by AP, precision, recall, F1 and image AUROC on one test split. Resumable: "
                    "finished cells in OUT/cells are kept.")
    parser.add_argument("--data", required=True,
                        help="category folder: MVTec/AutoVI layout (its real defects are split between full-shot "
                             "training and test) or KolektorSDD2 layout (train/, test/, N.png + N_GT.png)")
    parser.add_argument("--out", required=True, help="study folder (created; rerun to resume)")
    parser.add_argument("--methods", default="offline",
                        help="synthesis methods, comma-separated: perlin, cutpaste, cutpaste_scar, memseg, diffusion "
                             "(offline: the four that need no weights)")
    parser.add_argument("--counts", default="80,100,120", help="numbers N_aug of synthetic defects, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the synthesis and the training")
    parser.add_argument("--epochs", type=int, default=30, help="most training epochs (early stopping)")
    parser.add_argument("--image-size", type=int, default=224, help="short side of the resized images, pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--patience", type=int, default=5, help="epochs without validation improvement before stopping")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the training images held out for early stopping")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        choices=("efficientnet_lite0", "efficientnet_lite2", "resnet50"),
                        help="pretrained backbone (resnet50: the seed's, needs torchvision's ImageNet weights)")
    parser.add_argument("--weights", default=None, help="local weights file of the backbone")
    parser.add_argument("--real-fraction", type=float, default=0.5,
                        help="share of an MVTec category's real defects used for full-shot training")
    parser.add_argument("--masks", default="generated",
                        help="where synthetic defects may appear: generated, real (masks of the real training "
                             "defects, as the seed) or a folder of drawn masks")
    parser.add_argument("--texture-dir", default=None, help="texture images for perlin and memseg (e.g. DTD)")
    parser.add_argument("--inpaint-model", default=None, help="local diffusers inpainting checkpoint (diffusion)")
    parser.add_argument("--prompts", default=None, help="TOML prompts file of the diffusion method")
    parser.add_argument("--no-patchcore", action="store_true", help="skip the PatchCore reference")
    parser.add_argument("--cam-examples", type=int, default=4, help="test images in each cell's CAM figure")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a busy machine; none: torch's default)")
    parser.set_defaults(run=cmd_synthesis_study)
