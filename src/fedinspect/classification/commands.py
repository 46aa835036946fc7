"""The ``classify`` and ``classify-experiment`` subcommands (added to ``fedinspect`` by :mod:`fedinspect.cli`).

Importing this module is cheap (no torch): the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedinspect.options import add_renamed, obfuscation, obfuscation_list, split_list

MODEL_CHOICES = ("cnn", "large", "mobile", "resnet50", "mobilenet_v2")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options of the run; those left unset take the recipe's value (fedinspect.classification.runner.recipe:
    the best measured one, with or without DP)."""
    group = parser.add_argument_group("federated training (unset: the best measured recipe, with or without DP)")
    group.add_argument("--clients", type=int, default=3, help="number of clients")
    group.add_argument("--rounds", type=int, default=None,
                       help="FedAvg training rounds (default: 5, 10 under DP, after the centered head's mean round)")
    group.add_argument("--partition", choices=("iid", "dirichlet"), default="iid",
                       help="client shares: iid, or label skew by a Dirichlet over classes")
    group.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")
    group.add_argument("--image-size", type=int, default=None, help="images are resized to this square in px "
                       "(default: 224, 64 for the cnn)")
    group.add_argument("--seed", type=int, default=0, help="seed of the split, shares, init, batches and noise")
    group.add_argument("--local-epochs", type=int, default=None,
                       help="local epochs per round (default: 20, 5 full-batch steps under DP)")
    group.add_argument("--batch-size", type=int, default=None, help="physical batch (micro-batch) size "
                       "(default: 32, 64 under DP)")
    group.add_argument("--accumulation-steps", type=int, default=None,
                       help="physical batches per optimizer step (logical batch = batch size x this; "
                            "default: 1, 8 under DP: logical batches of 512)")
    group.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                       help="local optimizer (default: adam, sgd under DP; the PIDS paper: sgd with --lr 0.1 "
                            "--momentum 0)")
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: 3e-3; under DP 80, or 20 at --dp-epsilon below 8)")
    group.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0.9, 0 under DP)")
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="learning rate over the rounds: constant, or a cosine decay to 0")
    group.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                       help="weigh the loss by inverse class frequency (without DP only)")
    group.add_argument("--resize", choices=("squash", "letterbox"), default="squash",
                       help="images to the square: stretched, or letterboxed on mid-grey")
    group.add_argument("--pooling", choices=("avg", "avgmax", "blocks"), default=None,
                       help="pooled features of a transfer model: average of the last map, average and maximum, "
                            "or the averages of the last stride-16 and stride-32 blocks (EfficientNet-Lite) "
                            "(default: blocks, avgmax under DP)")
    group.add_argument("--head", choices=("mlp", "linear", "centered"), default=None,
                       help="head on the pooled features: the seed's dense 128 + dense, one dense layer, or one "
                            "dense layer on features centred on the clients' DP mean, sent in a first round "
                            "(needs --project) (default: mlp, centered under DP)")
    group.add_argument("--views", type=int, choices=(1, 2, 4, 8), default=None,
                       help="average each image's features over this many of its flips and 90-degree rotations "
                            "(default: 1, 8 under DP)")
    group.add_argument("--project", type=int, default=None,
                       help="project the features to this many dimensions (a seeded random orthogonal map) and "
                            "unit norm; 0: no projection (default: 0; under DP 512, or 128 at --dp-epsilon 1 or below)")
    group.add_argument("--validation", action="store_true",
                       help="for tuning: train on 80 %% of the training images and evaluate on the other 20 %%; the "
                            "test split is not read")
    group.add_argument("--train-fraction", type=float, default=1.0,
                       help="for learning curves: deal the clients only this stratified fraction of the training "
                            "images (seeded by --seed); the test split does not change")
    group.add_argument("--flip-augment", action="store_true",
                       help="add the training images' mirrors as more samples (without DP only)")
    group.add_argument("--fine-tune", action="store_true",
                       help="train the pretrained backbone too (slow on CPU; BatchNorm -> GroupNorm under DP)")
    group.add_argument("--weights", default=None, help="local weight file of the backbone")
    group.add_argument("--obfuscation-key", type=int, default=None,
                       help="secret key of shuffle / switch_row (default: the seed); never written to results")
    dp = parser.add_argument_group("DP-SGD (Opacus)")
    add_renamed(dp, "--dp-clip", ["--max-grad-norm"], type=float, default=None,
                help="per-sample L2 clipping bound of the gradients (default: 0.25 in the DP recipe, 1 otherwise)")
    add_renamed(dp, "--dp-delta", ["--delta"], type=float, default=1e-5,
                help="delta of the (epsilon, delta) guarantee")
    dp.add_argument("--accountant", choices=("rdp", "prv", "gdp"), default="rdp",
                    help="privacy accountant of Opacus that reports epsilon")


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """The options the user set (not None), under their config names."""
    return {field: getattr(args, option) for option, field in names.items() if getattr(args, option, None) is not None}


def _config(args: argparse.Namespace, dp: bool | None = None, **overrides):
    from fedinspect.classification.runner import recipe

    train = {"noise_multiplier": getattr(args, "dp_noise", None), "delta": args.dp_delta,
             "accountant": args.accountant, "lr_schedule": args.lr_schedule, "class_weight": args.class_weight,
             **_given(args, {"local_epochs": "local_epochs", "batch_size": "batch_size",
                             "accumulation_steps": "accumulation_steps", "lr": "lr", "optimizer": "optimizer",
                             "momentum": "momentum", "dp_clip": "max_grad_norm"})}
    values = dict(
        clients=args.clients, partition=args.partition, alpha=args.alpha,
        obfuscate=obfuscation(getattr(args, "obfuscate", "")) or (),
        obfuscation_key=args.seed if args.obfuscation_key is None else args.obfuscation_key,
        fine_tune=args.fine_tune, weights=args.weights, seed=args.seed, resize=args.resize,
        flip_augment=args.flip_augment, validation=args.validation, train_fraction=args.train_fraction,
        dp_epsilon=getattr(args, "dp_epsilon", None),
        **_given(args, {"model": "model", "image_size": "image_size", "head": "head", "pooling": "pooling",
                        "rounds": "rounds", "views": "views", "project": "project"}),
    )
    values.update(overrides)
    return recipe(bool(dp), train=train, **values)


def _settings_error(error: ValueError) -> Exception:
    from fedinspect.errors import FedinspectError

    return FedinspectError(f"invalid settings: {error}")


def cmd_classify(args: argparse.Namespace) -> int:
    from fedinspect.classification.report import fmt, fmt_epsilon

    try:
        config = _config(args)
    except ValueError as error:
        raise _settings_error(error) from error
    if args.engine == "flower-sim":
        from fedinspect.classification.runner import run_flower_simulation as run
    else:
        from fedinspect.classification.runner import run_classification as run
    results = run(args.data, args.out, config, progress=not args.quiet)
    print(f"{results['config']['model']} on {Path(results['dataset']).name} ({len(results['classes'])} classes, "
          f"{results['engine']}): accuracy {fmt(results['accuracy'])}, macro-F1 {fmt(results['macro_f1'])}, "
          f"loss {fmt(results['loss'])} after {config.rounds} rounds [{results['timing']['total_s']:.1f} s]")
    if "epsilon" in results:
        print("epsilon per client (cumulative): "
              + ", ".join(f"{c} {fmt_epsilon(e)}" for c, e in results["epsilon"].items()))
    print(f"results.json, report.md and report.html in {args.out}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from fedinspect.classification.experiment import ExperimentPlan, run_experiment

    try:
        plan = ExperimentPlan(
            base=_config(args), dp_base=_config(args, dp=True), models=split_list(args.models, "--models"),
            obfuscations=_table_obfuscations(args.obfuscations, "--obfuscations"),
            transfer_obfuscations=_table_obfuscations(args.transfer_obfuscations, "--transfer-obfuscations"),
            noise_multipliers=split_list(args.noise, "--noise", float),
            target_epsilons=split_list(args.target_epsilon, "--target-epsilon", float),
            image_sizes={"cnn": args.cnn_image_size} if args.cnn_image_size else {},
        )
        for model in plan.models:
            if model not in MODEL_CHOICES:
                raise ValueError(f"unknown model {model!r}; choose from {list(MODEL_CHOICES)}")
    except ValueError as error:
        raise _settings_error(error) from error
    summary = run_experiment(args.data, args.out, plan, progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(summary['rows'])} runs; experiment.json and report.md in {args.out}")
    return 0


def _table_obfuscations(values: list[str], option: str) -> tuple[str, ...]:
    """The experiment's obfuscation list, in its own spelling: ``none`` or methods joined by ','."""
    return tuple(o or "none" for o in obfuscation_list(values, option))


def add_classification_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``classify`` and ``classify-experiment`` to the ``fedinspect`` subcommands."""
    classify = commands.add_parser("classify", help="federated defect classification with DP-SGD and obfuscation")
    classify.add_argument("--data", required=True, help="category folder (AutoVI or MVTec AD layout)")
    classify.add_argument("--out", required=True, help="run folder to write")
    classify.add_argument("--model", choices=MODEL_CHOICES, default=None,
                          help="cnn, large (EfficientNet-Lite2), mobile (EfficientNet-Lite0), resnet50, "
                               "mobilenet_v2 (last two: local torchvision weights needed; with --pooling avg) "
                               "(default: mobile; cnn for obfuscated images without DP)")
    noise = classify.add_mutually_exclusive_group()
    noise.add_argument("--dp-epsilon", type=float, default=None,
                       help="DP-SGD spending this epsilon per client over all rounds (the noise multiplier is "
                            "derived with the accountant; default: no DP)")
    noise.add_argument("--dp-noise", type=float, default=None,
                       help="instead of --dp-epsilon: the DP-SGD noise multiplier (default: no DP)")
    classify.add_argument("--obfuscate", default="",
                          help="obfuscate images first, methods joined by '+': average+shuffle+switch_row")
    classify.add_argument("--engine", choices=("in-process", "flower-sim"), default="in-process",
                          help="run the clients in this process, or as Flower SuperNodes in the Simulation Engine")
    _add_training_options(classify)
    classify.set_defaults(run=cmd_classify)

    experiment = commands.add_parser("classify-experiment",
                                     help="Tables I and III of the PIDS paper: models x obfuscation x DP noise")
    experiment.add_argument("--data", required=True, help="category folder")
    experiment.add_argument("--out", required=True, help="experiment folder (resumable)")
    # nargs="+": the space-separated spelling of the previous release still parses (deprecated)
    experiment.add_argument("--models", nargs="+", default="cnn,mobile,large", help="models, comma-separated")
    experiment.add_argument("--obfuscations", nargs="+", default="none,average,shuffle,switch_row,"
                            "average+shuffle+switch_row",
                            help="obfuscations of the CNN in Table I, comma-separated, methods joined by '+'")
    experiment.add_argument("--transfer-obfuscations", nargs="+", default="none,average+shuffle+switch_row",
                            help="obfuscations of the transfer models in Table I")
    experiment.add_argument("--noise", nargs="+", default="0.01,0.05",
                            help="noise multipliers of Table III, comma-separated (the PIDS paper's)")
    experiment.add_argument("--target-epsilon", nargs="+", default="10,1",
                            help="Table III also runs the noise giving each of these epsilons after all rounds")
    experiment.add_argument("--cnn-image-size", type=int, default=64, help="image size of the CNN (0: --image-size)")
    _add_training_options(experiment)
    experiment.set_defaults(run=cmd_experiment, image_size=128)
