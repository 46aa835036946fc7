"""Benchmark the secure sum (SecAgg+, Flower 1.41) of PaDiM's statistics against the plain sum.

Usage::

    .venv/bin/python benchmarks/bench_secure_aggregation.py [--out runs/bench_secure_aggregation]
        [--clients 5 20] [--positions 256 16] [--features 100 20] [--images 8] [--seed 0]

For every (clients, positions, features) cell: each simulated client computes PaDiM's statistics
(count, sum (P, k), sum of outer products (P, k, k)) from random non-negative features (N images,
each position's vector clipped to the public L2 bound), the server obtains their sum once through
SecAgg+ and once in the clear, both on Flower's Simulation Engine. Reported per cell: the wall time of
the whole simulation and of the ServerApp's workflow, the bytes one client receives + sends (Flower's
serialized message contents, as in deployment), the max absolute and relative error of each sum
against the exact float64 sum computed here, the derived bound, and the resulting covariance error.
Default cells: P = 256 positions (16 x 16 at image size 128), k = 100 features (2.57 M values), and a
smaller P = 16, k = 20 (6.7 k values). Writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np

from fedinspect.federation.secure_sum import (
    SecureSumSettings,
    padim_specs,
    padim_statistics,
    plain_sum_simulation,
    secure_sum_simulation,
)

ROOT = Path(__file__).resolve().parents[1]
FEATURE_BOUND = 20.0  # public L2 bound on one position's feature vector (k = 100 |N(0,1)| has norm ~10)
MAX_IMAGES = 64  # public bound on one client's image count


def client_features(partition: int, images: int, positions: int, k: int, seed: int) -> np.ndarray:
    """Random non-negative (post-ReLU-like) features of one client, (N, P, k)."""
    rng = np.random.default_rng([seed, partition])
    return np.abs(rng.normal(size=(images, positions, k))) * np.sqrt(100.0 / k)


def compute(partition: int, config: dict, *, images: int, positions: int, k: int, seed: int) -> list[np.ndarray]:
    arrays, _ = padim_statistics(client_features(partition, images, positions, k, seed), config["feature-bound"])
    return arrays


def covariance(stats: list[np.ndarray]) -> np.ndarray:
    """PaDiM's covariance from summed statistics (Padim.set_statistics' formula, without eps)."""
    count, total, outer = float(stats[0][0]), stats[1], stats[2]
    mean = total / count
    return (outer - count * np.einsum("pi,pj->pij", mean, mean)) / (count - 1)


def errors(got: list[np.ndarray], exact: list[np.ndarray]) -> dict[str, float]:
    abs_err = max(float(np.max(np.abs(g - e))) for g, e in zip(got, exact, strict=True))
    scale = max(float(np.max(np.abs(e))) for e in exact)
    cov_exact = covariance(exact)
    cov_err = float(np.max(np.abs(covariance(got) - cov_exact)))
    return {"max_abs_error": abs_err, "max_rel_error": abs_err / scale,
            "count_exact": bool(got[0][0] == exact[0][0]),
            "covariance_max_abs_error": cov_err,
            "covariance_max_rel_error": cov_err / float(np.max(np.abs(cov_exact)))}


def run_cell(clients: int, positions: int, k: int, images: int, seed: int) -> dict:
    settings = SecureSumSettings(padim_specs(positions, k, MAX_IMAGES, FEATURE_BOUND), seed=seed,
                                 client_config={"feature-bound": FEATURE_BOUND})
    fn = functools.partial(compute, images=images, positions=positions, k=k, seed=seed)
    per_client = [fn(i, {"feature-bound": FEATURE_BOUND}) for i in range(clients)]
    exact = [np.sum([c[j] for c in per_client], axis=0) for j in range(3)]
    del per_client
    row: dict = {"clients": clients, "positions": positions, "features": k, "images_per_client": images,
                 "values": int(sum(s.size for s in settings.specs)), "protocol": settings.protocol(clients),
                 "error_bound_sum_outer": settings.error_bound(clients)[2]}
    for name, run in (("secure", secure_sum_simulation), ("plain", plain_sum_simulation)):
        start = time.perf_counter()
        result = run(fn, clients, settings)
        row[name] = {"wall_s": time.perf_counter() - start, "aggregation_s": result.aggregation_s,
                     "bytes_per_client": result.bytes_per_client,
                     "bytes_up_per_client": float(np.mean(list(result.bytes_up.values()))),
                     "exchange_s": result.exchange_s, "out_of_range": result.out_of_range,
                     **errors(result.sum, exact)}
        print(f"  {name}: {row[name]['wall_s']:.1f} s", flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'clients':>7} {'values':>9} {'mode':>6} {'wall s':>7} {'agg s':>7} {'MB/client':>9} "
            f"{'max abs err':>11} {'max rel err':>11} {'bound':>9} {'cov rel err':>11}")
    lines = [head, "-" * len(head)]
    for row in rows:
        for mode in ("secure", "plain"):
            r = row[mode]
            bound = f"{row['error_bound_sum_outer']:9.2e}" if mode == "secure" else f"{0:9.0f}"
            lines.append(f"{row['clients']:>7} {row['values']:>9} {mode:>6} {r['wall_s']:7.1f} "
                         f"{r['aggregation_s']:7.1f} "
                         f"{r['bytes_per_client'] / 1e6:9.2f} {r['max_abs_error']:11.2e} {r['max_rel_error']:11.2e} "
                         f"{bound} {r['covariance_max_rel_error']:11.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_secure_aggregation"))
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--positions", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--features", type=int, nargs="+", default=[100, 20])
    parser.add_argument("--images", type=int, default=8, help="images per client")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if len(args.positions) != len(args.features):
        parser.error("--positions and --features pair up: give as many of each")

    rows = []
    for positions, k in zip(args.positions, args.features, strict=True):
        for clients in args.clients:
            print(f"{clients} clients, P = {positions}, k = {k}", flush=True)
            rows.append(run_cell(clients, positions, k, args.images, args.seed))
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"feature_bound": FEATURE_BOUND, "max_images": MAX_IMAGES, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
