"""Seed 004's cross-dataset experiment as a federation: two factories, two products, one detector.

Usage::

    .venv/bin/python benchmarks/bench_two_factories.py [--products DIR DIR] [--detectors padim,ae_mse,...]
        [--image-size 128] [--rounds 6] [--out runs/bench_two_factories] [--json-dir benchmarks/results]

Factory A holds the real magnetic tiles, factory B the real metal plates (``--partition category``: each
client holds one product). For each detector: each factory's model trained on its own images alone and
tested on both products (the cross-dataset test), one model federated by the two (``--model-scope
shared``: statistics summed for PaDiM, FedAvg rounds for the trained detectors) and the centralized model
on the union, with thresholds T1-T3 as in the zoo study. Prints image AUROC and AUC-sPRO@0.05 per product
and model; writes ``bench_two_factories.json``. The products are linked (never copied) into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fedinspect.detectors.registry import TRAINED
from fedinspect.federation.detector_task import DetectorFederationConfig, run_detector_federation

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
PRODUCTS = (REAL / "mtd" / "magnetic_tile", REAL / "mpdd" / "metal_plate")


def linked_dataset(products: list[Path], root: Path) -> Path:
    """A dataset folder whose categories are links to ``products``."""
    root.mkdir(parents=True, exist_ok=True)
    for product in products:
        link = root / product.name
        if not link.exists():
            link.symlink_to(product.resolve(), target_is_directory=True)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", nargs=2, default=[str(p) for p in PRODUCTS])
    parser.add_argument("--detectors", default="padim,reverse_distillation,ae_mse")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="FedAvg rounds of the trained detectors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_two_factories"))
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    products = [Path(p) for p in args.products]
    if not all((p / "train").is_dir() for p in products):
        print(f"skipped: no category folders at {products}")
        return 0
    out = Path(args.out)
    data = linked_dataset(products, out / "data")
    rows: list[dict[str, Any]] = []
    for name in args.detectors.split(","):
        params: dict[str, Any] = {"image_size": args.image_size}
        if name == "padim":
            params["keep_aspect_ratio"] = False  # the tiles have many shapes; one grid for both products
        config = DetectorFederationConfig(detector=name, params=params, clients=2, partition="category",
                                          rounds=args.rounds if name in TRAINED else 1, model_scope="shared",
                                          local_baseline=True)
        run = out / name
        if (run / "results.json").is_file() and json.loads((run / "results.json").read_text()).get(
                "config") == config.to_dict():
            results = json.loads((run / "results.json").read_text())
        else:
            print(f"running {name}")
            try:
                results = run_detector_federation(data, run, config, progress=True)
            except Exception as error:  # reported; the other detectors still run
                print(f"{name} failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
        models = [(f"{client} alone", block["categories"]) for client, block in results["local_only"].items()]
        models += [("federated", results["categories"]), ("centralized", results["centralized"]["categories"])]
        for label, categories in models:
            row = {"detector": name, "model": label}
            for product in products:
                entry = categories[product.name]
                row[f"{product.name}_image_auroc"] = entry["image_auroc"]
                row[f"{product.name}_spro_0.05"] = entry["auc_spro"]["0.05"]
                row[f"{product.name}_T2_image_f1"] = ((entry.get("thresholds") or {}).get("T2") or {}).get("image_f1")
            rows.append(row)
        print(f"{name}: done ({results['partition']['sizes']} training images per factory)")
    names = [p.name for p in products]
    print("\ndetector | model | " + " | ".join(f"{n} AUROC | {n} sPRO@0.05" for n in names))
    for row in rows:
        print(f"{row['detector']} | {row['model']} | " + " | ".join(
            f"{row[f'{n}_image_auroc']:.3f} | {row[f'{n}_spro_0.05']:.3f}" for n in names))
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_two_factories.json").write_text(json.dumps({"products": names, "rows": rows}, indent=2))
    print(f"wrote {json_dir / 'bench_two_factories.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
