"""Benchmark every detector federated on the real magnetic tiles (issue 15's targets), side by side.

Usage::

    .venv/bin/python benchmarks/bench_detector_federation.py [--data DIR] [--clients 5]
        [--detectors padim,ae_mse,...] [--image-size 128] [--rounds N] [--secure-clients 5,20]
        [--out runs/bench_detector_federation] [--json-dir benchmarks/results]

For each detector: ``federate --detector NAME`` in process on ``--clients`` IID clients (FedAvg with one
local epoch per round for the trained detectors; their rounds default to the detector's own epochs, at
most 20; PaDiM one round of statistics), with the centralized model beside it. Prints the federated and
centralized image AUROC and AUC-sPRO@0.05, the rounds the federation needed to come within 1 point of
the centralized image AUROC, bytes per client per round and seconds per round; checks the targets:

- PaDiM federated equals centralized: max |score difference| on the test images below 1e-5;
- each trained detector comes within 1 point of its centralized image AUROC;
- PaDiM's sum through secure aggregation (SecAgg+) completes with ``--secure-clients`` clients (5 and
  20), with its time, traffic and difference to the plain sum.

Every run folder is kept under ``--out`` and reused when rerun (delete one to redo it). The magnetic
tiles have mixed aspect ratios: PaDiM stretches them to squares (``keep_aspect_ratio=False``). Writes
``bench_detector_federation.json`` to ``--json-dir``. Skips, saying so, without the data folder.
Time: about an hour for every detector at 128 px on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.padim import Padim
from fedinspect.detectors.registry import TRAINED, detector_parameters, load_detector
from fedinspect.federation.detector_task import DetectorFederationConfig, run_detector_federation

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real" / "mtd" / "magnetic_tile"
DETECTORS = ("padim", "ae_mse", "ae_ssim", "stfpm", "reverse_distillation", "draem", "cflow")
PADIM = {"keep_aspect_ratio": False}


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_or_reuse(data: Path, out: Path, config: DetectorFederationConfig, engine: str = "in-process") -> dict:
    """The run's results.json, computed unless a finished run with the same config is there."""
    results_file = out / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        if results.get("config") == config.to_dict():
            print(f"reusing {out}")
            return results
    print(f"running {out.name} ({engine})")
    return run_detector_federation(data, out, config, engine=engine, progress=True)


def padim_difference(data: Path, run: Path, image_size: int) -> float:
    """Max |score difference| between the federated PaDiM (saved in ``run``) and PaDiM fitted on all images."""
    dataset = CategoryDataset(data)
    central = Padim(image_size=image_size, **PADIM).fit([dataset.load_image(s) for s in dataset.train])
    federated = load_detector(run / "models" / dataset.name)
    test = [dataset.load_image(s) for s in dataset.test]
    return float(np.abs(federated.score_samples(test) - central.score_samples(test)).max())


def row(name: str, results: dict[str, Any], category: str) -> dict[str, Any]:
    fed = results["categories"][category]
    central = results["centralized"]["categories"][category]
    history = results["history"]
    sent = [np.mean(list(r["bytes_per_client"].values())) for r in history]
    return {
        "detector": name, "rounds": len(history),
        "federated_image_auroc": fed["image_auroc"], "centralized_image_auroc": central["image_auroc"],
        "federated_spro_0.05": fed["auc_spro"]["0.05"], "centralized_spro_0.05": central["auc_spro"]["0.05"],
        "gap_points": 100 * (central["image_auroc"] - fed["image_auroc"]),
        "rounds_to_within_1_point": results["rounds_to_centralized"][category],
        "bytes_per_client_per_round": float(np.mean(sent)), "seconds_per_round": float(np.mean(
            [r["seconds"] for r in history])), "centralized_fit_s": central.get("fit_s"),
        "rounds_total_s": results["timing"]["total_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="one category folder (MVTec layout)")
    parser.add_argument("--clients", type=int, default=5, help="IID clients")
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated")
    parser.add_argument("--image-size", type=int, default=128, help="short side (px)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="FedAvg rounds (none given: each detector's own epochs, at most 20)")
    parser.add_argument("--secure-clients", default="5,20", help="client counts of the SecAgg+ runs ('' = none)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_detector_federation"))
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, more threads spin against each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "train").is_dir():
        print(f"skipped: no category folder at {data}")
        return 0
    out = Path(args.out)
    category = data.name
    rows, checks = [], {}
    for name in [d for d in args.detectors.split(",") if d]:
        params: dict[str, Any] = {"image_size": args.image_size, **(PADIM if name == "padim" else {})}
        rounds = 1 if name not in TRAINED else args.rounds or min(20, detector_parameters(name)["epochs"])
        config = DetectorFederationConfig(detector=name, params=params, clients=args.clients, rounds=rounds)
        try:
            results = run_or_reuse(data, out / name, config)
        except Exception as error:  # one detector's failure is reported; the others still run
            print(f"{name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            checks[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        entry = row(name, results, category)
        rows.append(entry)
        if name == "padim":
            difference = padim_difference(data, out / name, args.image_size)
            checks[name] = {"max_abs_score_difference": difference, "equal_to_centralized": difference < 1e-5}
        else:
            checks[name] = {"within_1_point": entry["gap_points"] <= 1.0}
    for n in [int(v) for v in args.secure_clients.split(",") if v]:
        config = DetectorFederationConfig(detector="padim", params={"image_size": args.image_size, **PADIM},
                                          clients=n, rounds=1, centralized=False, secure=True)
        try:
            secure = run_or_reuse(data, out / f"padim_secure_{n}", config, engine="flower-sim")
            plain = run_or_reuse(data, out / f"padim_plain_{n}",
                                 DetectorFederationConfig(**{**config.to_dict(), "secure": False}))
        except Exception as error:
            print(f"secure aggregation with {n} clients failed: {type(error).__name__}: {error}", file=sys.stderr)
            checks[f"secure_{n}"] = {"error": f"{type(error).__name__}: {error}"}
            continue
        block = secure["secure_aggregation"]
        test = CategoryDataset(data)
        images = [test.load_image(s) for s in test.test]
        difference = float(np.abs(load_detector(out / f"padim_secure_{n}" / "models" / category).score_samples(images)
                                  - load_detector(out / f"padim_plain_{n}" / "models" / category).score_samples(images)
                                  ).max())
        checks[f"secure_{n}"] = {
            "completed": True, "wall_s": block["wall_s"], "aggregation_s": block["aggregation_s"],
            "bytes_per_client": block["bytes_per_client"],
            "plain_bytes_per_client": float(np.mean(list(plain["history"][0]["bytes_per_client"].values()))),
            "entries_clipped": block["entries_clipped"], "max_abs_score_difference_to_plain": difference,
            "image_auroc": secure["categories"][category]["image_auroc"],
            "plain_image_auroc": plain["categories"][category]["image_auroc"]}

    print(f"\n{category}, {args.clients} IID clients, {args.image_size} px")
    header = ("detector", "rounds", "fed AUROC", "central", "gap (pt)", "rounds to 1 pt", "fed sPRO.05", "central",
              "MB/client/round", "s/round")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["detector"], str(r["rounds"]), _fmt(r["federated_image_auroc"]),
                          _fmt(r["centralized_image_auroc"]), _fmt(r["gap_points"], 1),
                          str(r["rounds_to_within_1_point"]), _fmt(r["federated_spro_0.05"]),
                          _fmt(r["centralized_spro_0.05"]), _fmt(r["bytes_per_client_per_round"] / 1e6, 2),
                          _fmt(r["seconds_per_round"], 1)]))
    print("\nchecks:")
    for name, check in checks.items():
        print(f"  {name}: {check}")
    summary = {"data": str(data), "clients": args.clients, "image_size": args.image_size, "rows": rows,
               "checks": checks}
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_detector_federation.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {json_dir / 'bench_detector_federation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
