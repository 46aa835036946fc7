"""The ``fedinspect`` command line. Every command is a thin layer over a Python function.

Option conventions (lists, renamed options, defaults in the help) are in :mod:`fedinspect.options`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedinspect import __version__
from fedinspect.errors import FedinspectError
from fedinspect.options import NONE, HelpFormatter, obfuscation, obfuscation_list, split_list

if TYPE_CHECKING:
    from fedinspect.federation.detector_task import DetectorFederationConfig
    from fedinspect.federation.runner import FederationConfig


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PatchCore")
    group.add_argument("--backbone", default="efficientnet_lite0",
                       help="feature extractor: efficientnet_lite0, efficientnet_lite2 (weights ship with the "
                            "package) or wide_resnet50_2 (needs --weights)")
    group.add_argument("--weights", default=None, help="local weights file of the backbone (none: packaged weights)")
    group.add_argument("--image-size", type=int, default=256, help="short side after resizing (px)")
    group.add_argument("--runtime", choices=RUNTIMES, default=None,
                       help="what runs the frozen pretrained backbone of patchcore and padim and the frozen teacher "
                            "of stfpm, reverse_distillation and cflow (none given: openvino, measured 3.75x faster "
                            "than torch with the same features; see README 'Speed')")
    group.add_argument("--search", choices=("auto", "exact", "ivf", "hnsw"), default=None,
                       help="nearest-neighbour search in patchcore's memory bank (none given: auto, exact up to "
                            "5,000 rows and IVF above; see README 'Speed')")
    group.add_argument("--coreset-ratio", type=float, default=0.1,
                       help="fraction of patches kept (the centralized baseline's when federating)")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice")


def _add_device_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where a trained detector trains and scores (auto: CUDA when torch sees a GPU)")


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


# `fit` options whose detector parameter not every detector has: given for one that lacks it, they are refused.
# the backbone runtimes (fedinspect.backbones.RUNTIMES; spelled out so that --help imports no torch; a test checks)
RUNTIMES = ("torch", "onnx", "openvino", "openvino-bf16")
FIT_OPTIONS = {"backbone": "--backbone", "weights": "--weights", "runtime": "--runtime", "search": "--search",
               "coreset_ratio": "--coreset-ratio",
               "n_features": "--n-features", "epochs": "--epochs", "learning_rate": "--lr",
               "batch_size": "--batch-size", "patience": "--patience", "texture_dir": "--texture-dir"}


def _fit_params(args: argparse.Namespace) -> dict:
    """The detector's settings from `fit`'s options; an option the detector does not take is an error."""
    from fedinspect.detectors.registry import detector_parameters

    accepted = detector_parameters(args.detector)
    params = {"image_size": args.image_size, "seed": args.seed}
    for dest, flag in FIT_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest not in accepted:
            takers = ", ".join(name for name in _detectors_taking(dest)) or "none"
            raise FedinspectError(f"{flag} does not apply to --detector {args.detector} (detectors that take it: "
                                  f"{takers})")
        params[dest] = value
    return params


def _detectors_taking(parameter: str) -> list[str]:
    from fedinspect.detectors.registry import DESCRIPTIONS, detector_parameters

    return [name for name in DESCRIPTIONS if parameter in detector_parameters(name)]


def _cmd_fit(args: argparse.Namespace) -> int:
    from fedinspect.pipeline import fit_category, peak_memory_mb

    model = fit_category(args.data, args.out, progress=not args.quiet, detector=args.detector, device=args.device,
                         **_fit_params(args))
    if args.detector == "padim":
        fitted = (f"PaDiM Gaussians on a {model.grid_shape_[0]} x {model.grid_shape_[1]} grid of "
                  f"{model.n_features} features")
    elif args.detector == "patchcore":
        fitted = (f"{model.n_train_patches_} patches -> memory bank {model.memory_bank_.shape[0]} x "
                  f"{model.memory_bank_.shape[1]}")
    else:
        trained_on = model.n_train_images_ - model.n_validation_images_
        fitted = (f"{len(model.history_)} epochs on {trained_on} of them, best validation loss at epoch "
                  f"{model.best_epoch_}")
    print(f"fitted {Path(args.data).name}: {model.n_train_images_} images, {fitted} in {model.fit_seconds_:.1f} s "
          f"(peak memory {peak_memory_mb():.0f} MiB); saved to {args.out}")
    return 0


def _cmd_detectors(args: argparse.Namespace) -> int:
    from fedinspect.detectors.registry import DESCRIPTIONS, TRAINED, detector_parameters

    width = max(map(len, DESCRIPTIONS))
    for name, description in DESCRIPTIONS.items():
        print(f"{name:<{width}}  {description}")
        if name in TRAINED:
            defaults = detector_parameters(name)
            shown = ", ".join(f"{key} {defaults[key]}" for key in ("epochs", "learning_rate", "batch_size", "patience")
                              if key in defaults)
            print(f"{'':<{width}}  trained: {shown}")
    return 0


SYNTHETIC_VALIDATION_METHODS = ("perlin", "cutpaste", "cutpaste_scar", "memseg")
"""The offline generators of :mod:`fedinspect.synthesis` (``OFFLINE_METHODS``; spelled here so that building
the parser imports no numpy)."""


def _add_synthetic_validation_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic-validation", choices=(NONE, *SYNTHETIC_VALIDATION_METHODS), default=NONE,
                        help="choose T2/T3 on this generator's synthetic defects drawn into the good images of the "
                             "T1 share of the training images, for a factory without defective images; the "
                             "real-chosen ones are reported beside them when the test images have defects "
                             "(none: chosen on 15%% of the test images)")


def _synthetic_method(value: str) -> str | None:
    return None if value == NONE else value


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedinspect.evaluation.summary import results_table
    from fedinspect.pipeline import ThresholdOptions, evaluate_category

    thresholds = ThresholdOptions(synthetic_validation=_synthetic_method(args.synthetic_validation))
    results = evaluate_category(args.model, args.data, args.out, progress=not args.quiet, weights=args.weights,
                                runtime=args.runtime, thresholds=thresholds)
    print(results_table({results["category"]: results}))
    print(f"results and 16-bit anomaly maps in {args.out}")
    return 0


def _federation_config(args: argparse.Namespace) -> FederationConfig:
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig

    try:
        settings = RoundSettings(
            backbone=args.backbone, image_size=args.image_size, local_coreset_ratio=args.local_coreset_ratio,
            precision=args.precision, seed=args.seed, **_privacy_settings(args),
            **({"runtime": args.runtime} if args.runtime is not None else {}),
            **({"search": args.search} if args.search is not None else {}),
        )
        return FederationConfig(
            clients=args.clients, partition=args.partition, alpha=args.alpha, strategy=args.strategy,
            global_size=args.global_size, global_ratio=args.global_ratio, bank=args.bank,
            min_per_client=args.min_per_client, min_clients=args.min_clients or 1,
            centralized=not getattr(args, "no_centralized", False), centralized_coreset_ratio=args.coreset_ratio,
            compare_shared=not getattr(args, "no_shared_comparison", False), attack_data=args.attack_data,
            poison=getattr(args, "poison", ""), poison_strength=getattr(args, "poison_strength", 0.0),
            poisoned_clients=args.poisoned_clients if getattr(args, "poison", "") else 0, settings=settings,
        )
    except ValueError as error:  # e.g. --dp-epsilon 0, more poisoned clients than clients
        raise FedinspectError(f"invalid settings: {error}") from error


def _privacy_settings(args: argparse.Namespace) -> dict:
    """RoundSettings fields for DP and obfuscation; the obfuscation key comes from the flag or the environment.

    A command without the single-run options (``privacy-study``, whose grid sets them) leaves them off.
    """
    from fedinspect.privacy.bank_dp import DEFAULT_CLIP_NORM

    values: dict = {"dp_delta": args.dp_delta,
                    "dp_clip_norm": args.dp_clip if args.dp_clip is not None else DEFAULT_CLIP_NORM}
    methods = obfuscation(getattr(args, "obfuscate", ""))
    if methods:
        values.update(obfuscation=methods, obfuscation_key=_obfuscation_key(args, "--obfuscate"))
    dp_epsilon, dp_noise = getattr(args, "dp_epsilon", None), getattr(args, "dp_noise", None)
    if dp_epsilon is not None or dp_noise is not None:
        values.update(dp_unit=args.dp_unit, dp_epsilon=dp_epsilon or 0.0, dp_noise_multiplier=dp_noise or 0.0)
    return values


def _obfuscation_key(args: argparse.Namespace, needed_by: str) -> int:
    """The federation's secret obfuscation key: ``--obfuscation-key`` or FEDINSPECT_OBFUSCATION_KEY."""
    import os

    key = args.obfuscation_key if args.obfuscation_key is not None else os.environ.get("FEDINSPECT_OBFUSCATION_KEY")
    if key is None:
        raise FedinspectError(f"{needed_by} needs the federation's secret key: pass --obfuscation-key N "
                              "or set FEDINSPECT_OBFUSCATION_KEY")
    try:
        value = int(key)
    except ValueError as error:
        raise FedinspectError(f"obfuscation key must be a non-negative integer, got {key!r}") from error
    if value < 0:
        raise FedinspectError(f"obfuscation key must be a non-negative integer, got {key!r}")
    return value


def _print_federation(results: dict, out: Path) -> None:
    from fedinspect.evaluation.report import describe_stages
    from fedinspect.evaluation.summary import results_table

    print("federated (global bank per category)" if results["config"]["bank"] == "per_category"
          else "federated (one shared bank)")
    print(results_table(results["categories"]))
    for name, label in (("centralized", "centralized baseline (pooled data)"),
                        ("shared_bank", "federated, one bank shared by all categories")):
        if name in results:
            print(f"\n{label}")
            print(results_table(results[name]["categories"]))
    sent = sum(c["bytes_sent"] for c in results["clients"])
    print(f"\n{len(results['clients'])} clients sent {sent / 1e6:.2f} MB in {results['timing']['total_s']:.0f} s")
    print(describe_stages(results["stages"], results["config"]))
    for missing in results["missing_clients"]:  # dropped out, or its update was rejected
        print(f"missing {missing['client']}: {missing['reason']}")
    print(f"results.json, report.md, report.html and maps/ in {out}")


def _federation_runner(engine: str):
    if engine == "flower-sim":
        from fedinspect.federation.flower_app import run_flower_simulation as run
    else:
        from fedinspect.federation.runner import run_federation as run
    return run


# `federate` options that only federated PatchCore takes (memory banks, their DP, obfuscation, attacks, poisoning).
PATCHCORE_FEDERATION_OPTIONS = ("strategy", "global_size", "global_ratio", "bank", "min_per_client", "min_clients",
                                "precision", "local_coreset_ratio", "coreset_ratio", "no_shared_comparison",
                                "obfuscate", "attack_data", "poison")
ROUND_OPTIONS = {"rounds": "--rounds", "local_epochs": "--local-epochs", "proximal_mu": "--proximal-mu",
                 "learning_rate": "--lr", "batch_size": "--batch-size"}


def _cmd_federate(args: argparse.Namespace) -> int:
    if args.detector != "patchcore":
        return _federate_detector(args)
    given = [option for dest, option in ROUND_OPTIONS.items() if getattr(args, dest) is not None]
    given += [option for dest, option in (("secure_aggregation", "--secure-aggregation"),
                                          ("keep_aspect_ratio", "--keep-aspect-ratio"))
              if getattr(args, dest) not in (None, False)]
    if args.dp_mode != "distributed":
        given.append("--dp-mode")
    given += [option for dest, option in (("model_scope", "--model-scope"), ("local_baseline", "--local-baseline"))
              if getattr(args, dest) not in ("category", False)]
    if given:
        raise FedinspectError(f"{', '.join(given)}: federated PatchCore is one round of memory banks; these options "
                              "are for the other detectors (--detector)")
    results = _federation_runner(args.engine)(args.data, args.out, _federation_config(args), progress=not args.quiet)
    _print_federation(results, Path(args.out))
    return 0


def _federate_detector(args: argparse.Namespace) -> int:
    """`federate --detector NAME` for every detector but PatchCore: the shared round engine."""
    from fedinspect.federation.detector_task import run_detector_federation

    config = detector_federation_config(args)
    results = run_detector_federation(args.data, args.out, config, engine=args.engine, progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8").split("## Rounds")[0].rstrip())
    print(f"results.json, report.md, report.html, models/ and one evaluation folder per category in {args.out}")
    return 1 if results["missing_clients"] else 0


def detector_federation_config(args: argparse.Namespace) -> DetectorFederationConfig:
    """The DetectorFederationConfig of `federate --detector NAME` options, refusing those of another kind."""
    from fedinspect.detectors.registry import TRAINED, detector_parameters
    from fedinspect.federation.detector_task import DetectorFederationConfig

    defaults = vars(build_parser().parse_args(["federate", "--data", args.data, "--out", args.out]))
    refused = [f"--{dest.replace('_', '-')}" for dest in PATCHCORE_FEDERATION_OPTIONS
               if getattr(args, dest) != defaults[dest]]
    if refused:
        raise FedinspectError(f"{', '.join(refused)}: options of federated PatchCore, not of --detector "
                              f"{args.detector}")
    takes = detector_parameters(args.detector)
    params: dict[str, object] = {"image_size": args.image_size}
    for dest in ("backbone", "weights", "runtime", "search", "learning_rate", "batch_size"):
        value = getattr(args, dest)
        if value is not None and value != defaults[dest]:
            if dest not in takes:
                raise FedinspectError(f"--{dest.replace('_', '-')}: {args.detector} does not take it")
            params[dest] = value
    trained = args.detector in TRAINED
    if not trained and any(getattr(args, dest) is not None for dest in ("rounds", "local_epochs", "proximal_mu")):
        raise FedinspectError(f"--rounds, --local-epochs, --proximal-mu: {args.detector} is federated in one round "
                              "of summed statistics")
    if trained:
        given = [option for dest, option in (("secure_aggregation", "--secure-aggregation"),
                                             ("keep_aspect_ratio", "--keep-aspect-ratio"))
                 if getattr(args, dest) not in (None, False)]
        if args.dp_mode != "distributed":
            given.append("--dp-mode")
        if given:
            raise FedinspectError(f"{', '.join(given)}: options of PaDiM's one round of statistics, not of "
                                  f"{args.detector}'s FedAvg rounds")
        if args.dp_epsilon is not None:
            raise FedinspectError("--dp-epsilon: DP-SGD of a trained detector takes --dp-noise (the noise "
                                  "multiplier); each client's epsilon over its rounds is computed and reported")
    if args.keep_aspect_ratio is not None:
        if "keep_aspect_ratio" not in takes:
            raise FedinspectError(f"--keep-aspect-ratio: {args.detector} does not take it")
        params["keep_aspect_ratio"] = args.keep_aspect_ratio == "yes"
    privacy: dict[str, object] = {}
    if trained and args.dp_noise is not None:
        privacy = {"noise_multiplier": args.dp_noise, "max_grad_norm": 1.0 if args.dp_clip is None else args.dp_clip,
                   "delta": args.dp_delta}
    elif args.dp_epsilon is not None or args.dp_noise is not None:
        if args.dp_clip is None:
            raise FedinspectError("--dp-epsilon / --dp-noise with --detector padim need --dp-clip: the L2 bound on one "
                                  "image's features at all grid positions (choose it on public images)")
        if args.dp_unit != "image":
            raise FedinspectError("--dp-unit: PaDiM's statistics protect one image (--dp-unit image)")
        privacy = {"clip_norm": args.dp_clip, "epsilon": args.dp_epsilon, "noise_multiplier": args.dp_noise,
                   "delta": args.dp_delta, "mode": args.dp_mode}
    try:
        return DetectorFederationConfig(
            detector=args.detector, params=params, clients=args.clients, partition=args.partition, alpha=args.alpha,
            rounds=args.rounds if args.rounds is not None else (5 if trained else 1),
            local_epochs=args.local_epochs if args.local_epochs is not None else 1,
            proximal_mu=args.proximal_mu if args.proximal_mu is not None else 0.0, seed=args.seed,
            centralized=not args.no_centralized,
            privacy=privacy, secure=args.secure_aggregation, model_scope=args.model_scope,
            local_baseline=args.local_baseline, device=args.device)
    except ValueError as error:
        raise FedinspectError(f"invalid settings: {error}") from error


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedinspect.data.synthetic import generate_dataset

    out = Path(args.out)
    config = _federation_config(args)  # checked before the data are generated
    data = generate_dataset(out / "data", seed=args.seed, size=args.size, progress=not args.quiet)
    results = _federation_runner(args.engine)(data, out / "run", config, progress=not args.quiet)
    _print_federation(results, out / "run")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from fedinspect.study.config import load_study
    from fedinspect.study.runner import run_study

    summary = run_study(load_study(args.config), args.out, progress=not args.quiet)
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print("\n".join(f"- {line}" for line in summary["recommendations"]))
    cells = summary["cells"]
    print(f"{cells['total']} cells ({cells['ran']} run, {cells['reused']} done before, {cells['failed']} failed) in "
          f"{summary['wall_s']:.0f} s; table.csv, table.md, report.html in {args.out}")
    return 1 if cells["failed"] else 0


def _cmd_zoo_study(args: argparse.Namespace) -> int:
    from fedinspect.detectors.registry import DESCRIPTIONS
    from fedinspect.study.zoo import ZooSettings, run_zoo_study

    detectors = split_list(args.detectors, "--detectors")
    unknown = [name for name in detectors if name not in DESCRIPTIONS]
    if unknown or not detectors:
        raise FedinspectError(f"--detectors: unknown {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(DESCRIPTIONS)}")
    settings = ZooSettings(detectors=detectors, image_size=args.image_size, seed=args.seed,
                           percentile=args.t1_percentile, epochs=args.epochs, isolate=not args.in_process,
                           synthetic_validation=_synthetic_method(args.synthetic_validation))
    summary = run_zoo_study(args.data, args.out, settings, progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8").split("## Thresholds T1-T3")[0].rstrip())
    print(f"{len(summary['rows'])} tests, {len(summary['failed'])} failed cells in {summary['wall_s']:.0f} s; "
          f"zoo_study.json, report.md, report.html in {args.out}")
    return 1 if summary["failed"] else 0


def _add_federation_options(parser: argparse.ArgumentParser, comparisons: bool = True) -> None:
    """Federation options; ``comparisons=False`` leaves out the baselines a command does not run."""
    from fedinspect.federation.partition import SCHEMES
    from fedinspect.federation.server import BANK_MODES
    from fedinspect.federation.strategies import STRATEGIES
    from fedinspect.federation.update import PRECISIONS

    group = parser.add_argument_group("federation")
    group.add_argument("--clients", type=int, default=5, help="number of clients (factories)")
    group.add_argument("--partition", choices=SCHEMES, default="iid", help="how training images are split")
    group.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")
    group.add_argument("--strategy", choices=sorted(STRATEGIES), default="federated_coreset",
                       help="how the server merges the client banks (README 'Aggregation strategies')")
    group.add_argument("--global-size", type=int, default=10_000, help="patches in the global bank(s), total")
    group.add_argument("--global-ratio", type=float, default=None,
                       help="instead of --global-size: fraction of each bank's raw patches")
    group.add_argument("--bank", choices=BANK_MODES, default="per_category",
                       help="one global bank per category, or one bank shared by all categories")
    group.add_argument("--min-per-client", type=int, default=100,
                       help="patches guaranteed to each client (--strategy diversity_preserving)")
    group.add_argument("--min-clients", type=int, default=None,
                       help="fewest valid client updates to aggregate (none given: 1)")
    group.add_argument("--precision", choices=PRECISIONS, default="float16", help="embeddings on the wire")
    group.add_argument("--local-coreset-ratio", type=float, default=0.03,
                       help="fraction of its patches each client sends (default 0.03, see README 'Traffic')")
    if comparisons:
        group.add_argument("--no-centralized", action="store_true", help="skip the pooled-data baseline")
        group.add_argument("--no-shared-comparison", action="store_true",
                           help="skip the comparison with one bank shared by all categories")



def _add_poisoning_options(parser: argparse.ArgumentParser) -> None:
    """A drill: the last clients send poisoned updates (README 'Poisoned clients and robust aggregation')."""
    from fedinspect.federation.poisoning import ATTACKS, DEFAULT_STRENGTH

    drill = parser.add_argument_group("poisoning drill (in-process engine)")
    drill.add_argument("--poison", choices=ATTACKS, default="",
                       help="the last --poisoned-clients clients send poisoned updates: noise, scaled embeddings, "
                            "or embeddings of defective images")
    drill.add_argument("--poisoned-clients", type=int, default=1, help="how many clients --poison makes malicious")
    drill.add_argument("--poison-strength", type=float, default=0.0,
                       help="0: the attack's default (" + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_STRENGTH.items())
                            + ")")


def _add_privacy_options(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    """DP and obfuscation options; ``single_run=False`` leaves out those a study's grid sets itself."""
    from fedinspect.privacy.bank_dp import DEFAULT_CLIP_NORM, UNITS

    privacy = parser.add_argument_group("privacy (README 'Privacy')")
    if single_run:
        privacy.add_argument("--dp-epsilon", type=float, default=None,
                             help="differentially private banks at this epsilon (noise solved by the accountant)")
        privacy.add_argument("--dp-noise", type=float, default=None,
                             help="instead of --dp-epsilon: the noise multiplier")
    privacy.add_argument("--dp-unit", choices=UNITS, default="image",
                         help="what DP protects: one training image or one patch embedding (weaker)")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the (epsilon, delta) guarantee")
    privacy.add_argument("--dp-clip", type=float, default=None,
                         help=f"L2 clip norm of one unit's contribution: PatchCore, of one embedding (none given: "
                              f"{DEFAULT_CLIP_NORM:g}); PaDiM, of one image's features at all grid positions (needed: "
                              "e.g. sqrt(positions) x a typical position's norm measured on public images); a trained "
                              "detector, of one image's gradient (none given: 1)")
    if single_run:
        privacy.add_argument("--obfuscate", default="",
                             help="obfuscate images first, methods joined by '+': average+shuffle+switch_row")
    privacy.add_argument("--obfuscation-key", type=int, default=None,
                         help="the federation's secret obfuscation key (or FEDINSPECT_OBFUSCATION_KEY)")
    privacy.add_argument("--attack-data", default="",
                         help="the attacker's own images (a dataset folder): run the inversion and membership attacks")


def _cmd_privacy_study(args: argparse.Namespace) -> int:
    from fedinspect.data.synthetic import generate_dataset
    from fedinspect.evaluation.privacy_report import privacy_table
    from fedinspect.federation.privacy_study import PrivacyStudy, run_privacy_study

    out = Path(args.out)
    try:
        epsilons = split_list(args.epsilons, "--epsilons", _number_or_none)
        compare = _number_or_none(args.compare_unit_at)
    except ValueError as error:
        raise FedinspectError(f"--epsilons / --compare-unit-at take numbers or 'none': {error}") from error
    obfuscations = obfuscation_list(args.obfuscations)
    key = _obfuscation_key(args, "--obfuscations") if any(obfuscations) else 0
    config = _federation_config(args)
    config.centralized, config.compare_shared, config.write_maps = False, False, False
    attacker = args.attack_data
    if not attacker:  # the attacker generates images of its own
        attacker = generate_dataset(out / "attacker_data", seed=args.seed + 1, size="tiny", progress=not args.quiet)
    study = PrivacyStudy(epsilons=epsilons, obfuscations=obfuscations, unit=args.dp_unit, compare_unit_at=compare,
                         obfuscation_key=key)
    results = run_privacy_study(args.data, out, attacker, config, study, progress=not args.quiet)
    print(privacy_table(results["rows"]))
    print(f"privacy_study.json, report.md, report.html and privacy_pareto.png in {out}")
    return 0


def _number_or_none(text: str) -> float | None:
    return None if text.strip().lower() == NONE else float(text)


DESCRIPTION = """\
Privacy-preserving federated visual anomaly detection: each factory fits a detector on its own good
images, only model updates leave the site, results per category with the AutoVI protocol.

Start with `fedinspect demo`; `fedinspect COMMAND --help` describes each command. Lists are
comma-separated (--epsilons 1,5,none); obfuscation methods applied together are joined by '+'
(--obfuscate average+shuffle). Errors in the data or settings exit with code 2.
"""


def _finish_commands(commands: argparse._SubParsersAction) -> None:
    """Every command: a description line (its summary), defaults in its help, and -q accepted after it too."""
    for choice in commands._choices_actions:
        command = commands.choices[choice.dest]
        command.description = command.description or f"{choice.help[0].upper()}{choice.help[1:]}."
        command.formatter_class = HelpFormatter
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars (also accepted before the command)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedinspect", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedinspect {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="generate the synthetic dataset in the AutoVI layout")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--seed", type=int, default=0, help="seed of the generated images and defects")
    synth.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                       help="tiny (CI), small (the demo) or full (AutoVI-sized)")
    synth.set_defaults(run=_cmd_synth)

    from fedinspect.detectors.registry import DESCRIPTIONS

    fit = commands.add_parser("fit", help="fit a detector on one category's good training images")
    fit.add_argument("--data", required=True, help="category folder (AutoVI or MVTec AD layout)")
    fit.add_argument("--out", required=True, help="model folder to write")
    fit.add_argument("--detector", choices=tuple(DESCRIPTIONS), default="patchcore",
                     help="one-class detector ('fedinspect detectors' lists them)")
    _add_model_options(fit)
    group = fit._action_groups[-1]
    group.title = "detector (an option a detector does not take is refused)"
    for action in fit._actions:  # fit's own rule: given or the detector's own default
        if action.dest in ("backbone", "coreset_ratio"):
            action.help = f"{action.help} (detectors on backbone features; {action.default})"
            action.default = None
    group.add_argument("--n-features", type=int, default=None,
                       help="random feature channels modelled per position (padim; 100)")
    trained = fit.add_argument_group("trained detectors (ae_mse, ae_ssim, stfpm, reverse_distillation, draem, "
                                     "cflow; defaults: 'fedinspect detectors')")
    trained.add_argument("--epochs", type=int, default=None, help="most passes over the training images")
    _add_device_option(trained)
    trained.add_argument("--lr", dest="learning_rate", type=float, default=None, help="learning rate (Adam)")
    trained.add_argument("--batch-size", type=int, default=None, help="images per step (every detector)")
    trained.add_argument("--patience", type=int, default=None,
                         help="epochs without a better validation loss before stopping (0: never stop early)")
    trained.add_argument("--texture-dir", default=None,
                         help="folder of texture images for DRAEM's simulated anomalies, e.g. a DTD copy "
                              "(draem; none: textures shipped with scikit-image and generated ones)")
    fit.set_defaults(run=_cmd_fit)

    detectors = commands.add_parser("detectors", help="list the one-class detectors 'fit --detector' takes")
    detectors.set_defaults(run=_cmd_detectors)

    evaluate = commands.add_parser("evaluate", help="score a category's test split (AutoVI protocol)")
    evaluate.add_argument("--model", required=True, help="model folder written by 'fit'")
    evaluate.add_argument("--data", required=True, help="category folder")
    evaluate.add_argument("--out", required=True, help="results folder (results.json, maps/); replaced when done")
    evaluate.add_argument("--weights", default=None,
                          help="the backbone's local weights file the model was fitted with (checked by SHA-256)")
    evaluate.add_argument("--runtime", choices=RUNTIMES, default=None,
                          help="run the frozen backbone of a patchcore, padim, stfpm, reverse_distillation or cflow "
                               "model with this runtime (none given: the one it was fitted with)")
    _add_synthetic_validation_option(evaluate)
    evaluate.set_defaults(run=_cmd_evaluate)

    federate = commands.add_parser("federate", help="federate a detector (PatchCore by default), evaluated per "
                                                    "category")
    federate.add_argument("--data", required=True, help="dataset folder (one subfolder per category)")
    federate.add_argument("--out", required=True, help="run folder to write")
    federate.add_argument("--detector", choices=tuple(DESCRIPTIONS), default="patchcore",
                          help="patchcore: one round of memory banks; padim: one round of summed statistics; the "
                               "trained detectors: FedAvg over --rounds")
    _add_engine_option(federate)
    _add_model_options(federate)
    _add_federation_options(federate)
    models = federate.add_argument_group("every detector but PatchCore")
    models.add_argument("--model-scope", choices=("category", "shared"), default="category",
                        help="one model per category, or one model of every category (two factories with "
                             "different products federating one detector)")
    models.add_argument("--local-baseline", action="store_true",
                        help="also train each client's model on its own images alone and test it on every category")
    rounds = federate.add_argument_group("trained detectors (FedAvg / FedProx over rounds)")
    rounds.add_argument("--rounds", type=int, default=None, help="federated rounds (none given: 5)")
    _add_device_option(rounds)
    rounds.add_argument("--local-epochs", type=int, default=None,
                        help="epochs each client trains per round (none given: 1)")
    rounds.add_argument("--proximal-mu", type=float, default=None,
                        help="FedProx's proximal term mu (none given: 0, plain FedAvg)")
    rounds.add_argument("--lr", dest="learning_rate", type=float, default=None,
                        help="learning rate of the local training (none given: the detector's)")
    rounds.add_argument("--batch-size", type=int, default=None, help="images per step (none given: the detector's)")
    statistics = federate.add_argument_group("PaDiM (one round of summed statistics)")
    statistics.add_argument("--secure-aggregation", action="store_true",
                            help="the server learns only the sum of the clients' statistics (SecAgg+; --engine "
                                 "flower-sim)")
    statistics.add_argument("--dp-mode", choices=("distributed", "local"), default="distributed",
                            help="with --dp-epsilon: each client adds its share of one release's noise (the "
                                 "guarantee needs --secure-aggregation), or all of it")
    statistics.add_argument("--keep-aspect-ratio", choices=("yes", "no"), default=None,
                            help="no: stretch every image to a square, for categories of mixed shapes (none given: "
                                 "yes)")
    _add_privacy_options(federate)
    _add_poisoning_options(federate)
    federate.set_defaults(run=_cmd_federate)

    study = commands.add_parser("privacy-study",
                                help="DP budget x obfuscation grid with inversion and membership attacks")
    study.add_argument("--data", required=True, help="dataset folder (one subfolder per category)")
    study.add_argument("--out", required=True, help="study folder to write")
    study.add_argument("--epsilons", default="1,5,10,none",
                       help="DP budgets of the grid, comma-separated; 'none' = no DP")
    study.add_argument("--obfuscations", default="none,average+shuffle,average+shuffle+switch_row",
                       help="obfuscations of the grid, comma-separated, methods joined by '+'")
    study.add_argument("--compare-unit-at", default="1",
                       help="also run the other DP unit at this epsilon, without obfuscation ('none': skip)")
    _add_model_options(study)
    _add_federation_options(study, comparisons=False)
    _add_privacy_options(study, single_run=False)
    study.set_defaults(run=_cmd_privacy_study, obfuscation_key=20261122)

    demo = commands.add_parser("demo", help="generate the synthetic dataset and federate it (the main job)")
    demo.add_argument("--out", default="runs/demo", help="folder of the data and the run")
    demo.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                      help="synthetic dataset: tiny (CI), small or full (AutoVI-sized)")
    _add_engine_option(demo)
    _add_model_options(demo)
    _add_federation_options(demo)
    _add_privacy_options(demo)
    demo.set_defaults(run=_cmd_demo)

    zoo = commands.add_parser("zoo-study", help="every detector trained and tested within, across and on the union "
                                                "of datasets, with thresholds T1-T3 and cost (seed 004)")
    zoo.add_argument("--data", required=True, nargs="+", help="category folders (MVTec or AutoVI layout), one or more")
    zoo.add_argument("--out", required=True, help="study folder; finished models and tests in it are not redone")
    zoo.add_argument("--detectors", nargs="+", default=",".join(DESCRIPTIONS), help="detectors, comma-separated")
    zoo.add_argument("--image-size", type=int, default=256, help="short side after resizing (px)")
    zoo.add_argument("--epochs", type=int, default=None,
                     help="most epochs of every trained detector (default: each one's own)")
    zoo.add_argument("--t1-percentile", type=float, default=99.0, help="T1: percentile of good pixels")
    zoo.add_argument("--seed", type=int, default=0, help="seed of the shares and of every detector")
    zoo.add_argument("--in-process", action="store_true",
                     help="run the cells in this process (default: one fresh process each, so each peak memory "
                          "is its own)")
    _add_synthetic_validation_option(zoo)
    zoo.set_defaults(run=_cmd_zoo_study)

    study = commands.add_parser("study", help="a grid of federated runs with statistics and a report (STUDY.toml)")
    study.add_argument("--config", required=True, help="study file (README 'Fairness and studies')")
    study.add_argument("--out", required=True, help="study folder; finished cells in it are not run again")
    study.set_defaults(run=_cmd_study)

    from fedinspect.classification.commands import add_classification_commands

    add_classification_commands(commands)  # classify, classify-experiment (the PIDS paper)
    from fedinspect.synthesis.commands import add_synthesis_commands

    add_synthesis_commands(commands)  # synthesize (seed 003's defect generators)
    from fedinspect.study.synthesis_command import add_synthesis_study_command

    add_synthesis_study_command(commands)  # synthesis-study (seed 003's Tables 1-2)
    from fedinspect.meta.commands import add_meta_commands

    add_meta_commands(commands)  # meta-study (seed 002's MeDetection experiments)
    _finish_commands(commands)
    return parser


def _add_engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("in-process", "flower-sim"), default="in-process",
                        help="run the clients in this process, or as Flower SuperNodes in the Simulation Engine")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FedinspectError as error:
        print(f"fedinspect: error: {error}", file=sys.stderr)
        return 2
