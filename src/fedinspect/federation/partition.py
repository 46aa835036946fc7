"""Partitioners: which federated client (factory) holds which training image.

Every training item has a product category; the caller keeps the items in a fixed order and passes
``categories[i]`` for item ``i``. A :class:`Partition` maps each client to the sorted indices of the
items it holds; every item belongs to exactly one client.

Schemes (all deterministic from ``seed`` through ``numpy.random.default_rng(seed)``; no global state):

- ``iid``: every client holds every category, balanced. Within each category (sorted by name) the
  items are shuffled and dealt round-robin; the round-robin start carries over from one category to
  the next, so client sizes differ by at most 1 (AutoVI's 1,523 images over 5 clients: 305, 305,
  305, 304, 304) and per-category counts differ by at most 1 across clients.
- ``category``: each client is a factory making one or a few products.

  * ``categories_per_client=None`` and ``n_clients <= n_categories``: every category goes whole to
    one client. Categories are placed largest first (ties in a seeded order) on the client with the
    fewest images so far (greedy LPT balancing by *image count*, so a client may make several
    products), then client ids are a seeded permutation. The grouping is the image-balanced one; the
    seed decides which client id gets which group and breaks ties.
  * ``categories_per_client=None`` and ``n_clients > n_categories``: same as
    ``categories_per_client=1``: every client makes exactly one category; a category is split among
    several clients.
  * ``categories_per_client=c``: every client makes exactly ``c`` categories and every category is
    made by at least one client (needs ``n_clients * c >= n_categories``). The ``n_clients * c``
    client-category slots beyond one per category go, one at a time, to the category whose clients
    currently get the largest share (``count / n_makers``), never more makers than clients or than
    items. Makers are then chosen category by category (most makers first, then largest share):
    the clients with the most free slots, ties to the client with fewest images so far. A category's
    items are shuffled and split into near-equal disjoint shares among its makers.
- ``dirichlet``: label skew (Hsu et al., 2019). Per attempt and per category (sorted by name), in
  this order: ``p = rng.dirichlet(alpha * ones(n_clients))``, then ``rng.permutation`` of the
  category's items, cut at ``floor(cumsum(p)[:-1] * n_items_in_category)``; client ``i`` gets the
  ``i``-th piece. Small ``alpha`` (0.1) gives strong skew, large ``alpha`` (100) is close to iid.
  If some client ends with fewer than ``min_per_client`` items, the whole draw is repeated with the
  same generator (so the result is still a function of the seed, and is a draw from the Dirichlet
  scheme conditioned on the minimum) up to :data:`MAX_DIRICHLET_ATTEMPTS` times, then a ValueError
  says the alpha / n_clients / min_per_client combination is infeasible in practice.
- ``quantity``: quantity skew with the global category mix. Client weights are log-normal(0,
  ``quantity_sigma``) (drawn as ``rng.normal(0, sigma)`` then exponentiated after subtracting the
  max, which is the same distribution without overflow); sizes are ``min_per_client`` plus the rest
  split by the weights (largest remainder). The client x category count matrix is then the
  controlled rounding of ``size_i * count_j / n_items`` with exact row and column sums, so each
  client's mix is within about one image per category of the global mix; each category's shuffled
  items are dealt in client order.

``min_per_client`` (default 1) is checked for every scheme: ``dirichlet`` re-draws, ``quantity``
builds it into the sizes, and ``iid`` / ``category`` (whose sizes are fixed by the counts) raise a
ValueError if a client falls short.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedinspect.errors import DataError

SCHEMES = ("iid", "category", "dirichlet", "quantity")
MAX_DIRICHLET_ATTEMPTS = 1000
_FORMAT = "fedinspect-partition"
_VERSION = 1


@dataclass(frozen=True)
class Partition:
    """Which client holds which item: ``assignments[i]`` is the sorted tuple of item indices of client ``i``.

    Construction validates that the clients cover the items ``0 .. n_items - 1`` exactly once, so
    every Partition in memory (including one read from disk) is consistent.
    """

    scheme: str
    n_clients: int
    seed: int
    params: dict[str, Any]
    assignments: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, str) or not self.scheme:
            raise ValueError(f"scheme must be a non-empty string, got {self.scheme!r}")
        if not _is_int(self.n_clients) or self.n_clients < 1:
            raise ValueError(f"n_clients must be a positive integer, got {self.n_clients!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        if isinstance(self.assignments, (str, bytes)) or not isinstance(self.assignments, Sequence):
            raise ValueError("assignments must be a sequence of per-client index sequences")
        if len(self.assignments) != self.n_clients:
            raise ValueError(f"assignments has {len(self.assignments)} clients but n_clients is {self.n_clients}")
        clients: list[tuple[int, ...]] = []
        for client, items in enumerate(self.assignments):
            if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, np.ndarray)):
                raise ValueError(f"client {client}: assignment must be a sequence of item indices")
            if not all(_is_int(i) for i in items):
                raise ValueError(f"client {client}: item indices must be integers")
            clients.append(tuple(sorted(int(i) for i in items)))
        _check_cover(clients, sum(len(c) for c in clients))
        object.__setattr__(self, "n_clients", int(self.n_clients))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "assignments", tuple(clients))

    def __hash__(self) -> int:  # params (a dict) is left out; equal partitions still hash equal
        return hash((self.scheme, self.n_clients, self.seed, self.assignments))

    @property
    def n_items(self) -> int:
        """Total number of items over all clients."""
        return sum(len(items) for items in self.assignments)

    def sizes(self) -> list[int]:
        """Number of items held by each client, in client order."""
        return [len(items) for items in self.assignments]

    def client_of(self) -> np.ndarray:
        """Client id of every item (int64 array of length ``n_items``): the inverse of ``assignments``."""
        owner = np.empty(self.n_items, dtype=np.int64)
        for client, items in enumerate(self.assignments):
            owner[list(items)] = client
        return owner

    def counts(self, categories: Sequence[str]) -> dict[int, dict[str, int]]:
        """Per client, the number of items of each category (every category listed, sorted, zeros included)."""
        labels = list(categories)
        if len(labels) != self.n_items:
            raise ValueError(f"got {len(labels)} categories for a partition of {self.n_items} items")
        names = sorted(set(labels))
        result: dict[int, dict[str, int]] = {}
        for client, items in enumerate(self.assignments):
            row = dict.fromkeys(names, 0)
            for i in items:
                row[labels[i]] += 1
            result[client] = row
        return result

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_json` turns back into an equal Partition."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "scheme": self.scheme,
            "n_clients": self.n_clients,
            "seed": self.seed,
            "params": dict(self.params),
            "n_items": self.n_items,
            "assignments": [list(items) for items in self.assignments],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        """Rebuild a Partition from :meth:`to_json` output; ValueError if anything is missing or inconsistent."""
        if not isinstance(data, dict):
            raise ValueError(f"a partition must be a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a partition: 'format' is {data.get('format')!r}, expected {_FORMAT!r}")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported partition version {data.get('version')!r} (this code reads {_VERSION})")
        missing = [k for k in ("scheme", "n_clients", "seed", "params", "n_items", "assignments") if k not in data]
        if missing:
            raise ValueError(f"partition is missing field(s): {', '.join(missing)}")
        assignments = data["assignments"]
        if not isinstance(assignments, list) or not all(isinstance(a, list) for a in assignments):
            raise ValueError("'assignments' must be a list of lists of item indices")
        n_items = data["n_items"]
        if not _is_int(n_items) or n_items < 1:
            raise ValueError(f"'n_items' must be a positive integer, got {n_items!r}")
        if not all(_is_int(i) for a in assignments for i in a):
            raise ValueError("item indices must be integers")
        if len(assignments) != data["n_clients"]:
            raise ValueError(f"assignments has {len(assignments)} clients but n_clients is {data['n_clients']!r}")
        _check_cover(assignments, n_items)
        result = cls(
            scheme=data["scheme"],
            n_clients=data["n_clients"],
            seed=data["seed"],
            params=data["params"],
            assignments=tuple(tuple(a) for a in assignments),
        )
        return result

    def save(self, path: str | Path) -> Path:
        """Write the partition as JSON (one line per client), atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        header = json.dumps({k: v for k, v in data.items() if k != "assignments"}, indent=2)
        clients = ",\n    ".join(json.dumps(items) for items in data["assignments"])
        text = header[: -len("\n}")] + ',\n  "assignments": [\n    ' + clients + "\n  ]\n}\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a partition saved by :meth:`save`; a corrupt or inconsistent file raises a ValueError naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(path, f"not a valid partition file (bad JSON: {exc})") from exc
        try:
            return cls.from_json(data)
        except ValueError as exc:
            raise DataError(path, f"invalid partition file: {exc}") from exc


def partition(
    categories: Sequence[str],
    n_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    *,
    alpha: float = 0.5,
    categories_per_client: int | None = None,
    min_per_client: int = 1,
    quantity_sigma: float = 1.0,
) -> Partition:
    """Assign items (``categories[i]`` is the category of item ``i``) to ``n_clients`` clients.

    See the module docstring for the schemes. ``alpha`` is used by ``dirichlet``,
    ``categories_per_client`` by ``category``, ``quantity_sigma`` by ``quantity``; ``min_per_client``
    is the minimum number of items of every client in every scheme.
    """
    labels = _validate_categories(categories)
    if not _is_int(n_clients) or n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    n_clients = int(n_clients)
    n_items = len(labels)
    if n_clients > n_items:
        raise ValueError(f"more clients ({n_clients}) than items ({n_items}): every client needs at least one item")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (Dirichlet concentration) must be a finite number > 0, got {alpha!r}")
    if (
        isinstance(quantity_sigma, bool)
        or not isinstance(quantity_sigma, (int, float))
        or not math.isfinite(quantity_sigma)
        or quantity_sigma < 0
    ):
        raise ValueError(f"quantity_sigma must be a finite number >= 0, got {quantity_sigma!r}")
    if not _is_int(min_per_client) or min_per_client < 0:
        raise ValueError(f"min_per_client must be an integer >= 0, got {min_per_client!r}")
    min_per_client = int(min_per_client)
    if n_clients * min_per_client > n_items:
        raise ValueError(
            f"infeasible: {n_clients} clients x min_per_client={min_per_client} = "
            f"{n_clients * min_per_client} items needed, only {n_items} available"
        )
    if categories_per_client is not None and scheme != "category":
        raise ValueError(f"categories_per_client applies only to scheme 'category', not {scheme!r}")

    names, codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    members = [np.flatnonzero(codes == j) for j in range(len(names))]
    rng = np.random.default_rng(seed)

    params: dict[str, Any]
    if scheme == "iid":
        params = {}
        owner = _iid(members, n_items, n_clients, rng)
    elif scheme == "category":
        params = {"categories_per_client": None if categories_per_client is None else int(categories_per_client)}
        owner = _by_category(members, n_items, n_clients, categories_per_client, rng)
    elif scheme == "dirichlet":
        params = {"alpha": float(alpha), "min_per_client": min_per_client}
        owner = _dirichlet(members, n_items, n_clients, float(alpha), min_per_client, rng)
    else:
        params = {"quantity_sigma": float(quantity_sigma), "min_per_client": min_per_client}
        owner = _quantity(members, n_items, n_clients, float(quantity_sigma), min_per_client, rng)

    sizes = np.bincount(owner, minlength=n_clients)
    if sizes.min() < min_per_client:
        client = int(np.argmin(sizes))
        raise ValueError(
            f"infeasible: scheme {scheme!r} gives client {client} only {int(sizes[client])} items, "
            f"fewer than min_per_client={min_per_client} (sizes: {sizes.tolist()})"
        )
    assignments = tuple(tuple(np.flatnonzero(owner == c).tolist()) for c in range(n_clients))
    return Partition(scheme=scheme, n_clients=n_clients, seed=seed, params=params, assignments=assignments)


# --- schemes -----------------------------------------------------------------------------------


def _iid(members: list[np.ndarray], n_items: int, n_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle each category and deal round-robin, carrying the start over: sizes differ by at most 1."""
    owner = np.empty(n_items, dtype=np.int64)
    start = 0
    for items in members:
        shuffled = rng.permutation(items)
        owner[shuffled] = (start + np.arange(shuffled.size)) % n_clients
        start = (start + shuffled.size) % n_clients
    return owner


def _by_category(
    members: list[np.ndarray],
    n_items: int,
    n_clients: int,
    categories_per_client: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    n_categories = len(members)
    counts = np.array([m.size for m in members], dtype=np.int64)
    priority = rng.permutation(n_categories)  # seeded tie-break between equal-size categories
    relabel = rng.permutation(n_clients)  # abstract client k becomes client relabel[k]
    owner = np.empty(n_items, dtype=np.int64)

    if categories_per_client is None and n_clients <= n_categories:
        # Greedy LPT by image count: whole categories, largest first, to the least-loaded client.
        load = np.zeros(n_clients, dtype=np.int64)
        for j in sorted(range(n_categories), key=lambda j: (-counts[j], priority[j])):
            k = int(np.argmin(load))
            load[k] += counts[j]
            owner[members[j]] = relabel[k]
        return owner

    per_client = 1 if categories_per_client is None else categories_per_client
    if not _is_int(per_client) or not 1 <= per_client <= n_categories:
        raise ValueError(
            f"categories_per_client must be an integer in 1..{n_categories} (the number of categories), "
            f"got {categories_per_client!r}"
        )
    per_client = int(per_client)
    slots = n_clients * per_client
    if slots < n_categories:
        raise ValueError(
            f"infeasible: {n_clients} clients x categories_per_client={per_client} cover at most {slots} of the "
            f"{n_categories} categories, but every image must belong to a client; "
            "use more clients or more categories per client"
        )
    cap = np.minimum(counts, n_clients)  # a category cannot have more makers than clients or items
    if cap.sum() < slots:
        raise ValueError(
            f"infeasible: categories_per_client={per_client} with {n_clients} clients needs {slots} "
            f"client-category pairs, but the categories (sizes {counts.tolist()}) allow only {int(cap.sum())}"
        )
    makers = np.ones(n_categories, dtype=np.int64)
    for _ in range(slots - n_categories):
        # Give the extra maker to the category whose makers currently get the largest share.
        open_ = [j for j in range(n_categories) if makers[j] < cap[j]]
        j = min(open_, key=lambda j: (-counts[j] / makers[j], priority[j]))
        makers[j] += 1

    # Choose makers category by category: clients with the most free slots first (always completes,
    # Gale-Ryser), ties to the client with the fewest images so far.
    free = np.full(n_clients, per_client, dtype=np.int64)
    load = np.zeros(n_clients, dtype=np.float64)
    order = sorted(range(n_categories), key=lambda j: (-makers[j], -counts[j] / makers[j], priority[j]))
    for j in order:
        candidates = sorted(range(n_clients), key=lambda k: (-free[k], load[k], k))[: makers[j]]
        if len(candidates) < makers[j] or free[candidates].min() <= 0:  # cannot happen (see above)
            raise RuntimeError("category assignment failed; please report this as a bug")
        shares = np.array_split(rng.permutation(members[j]), makers[j])
        for k, share in zip(candidates, shares, strict=True):
            owner[share] = relabel[k]
            free[k] -= 1
            load[k] += share.size
    return owner


def _dirichlet(
    members: list[np.ndarray],
    n_items: int,
    n_clients: int,
    alpha: float,
    min_per_client: int,
    rng: np.random.Generator,
) -> np.ndarray:
    owner = np.empty(n_items, dtype=np.int64)
    concentration = np.full(n_clients, alpha)
    smallest = 0
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        for items in members:
            proportions = rng.dirichlet(concentration)
            shuffled = rng.permutation(items)
            owner[shuffled] = dirichlet_split(proportions, shuffled.size)
        sizes = np.bincount(owner, minlength=n_clients)
        smallest = int(sizes.min())
        if smallest >= min_per_client:
            return owner
    raise ValueError(
        f"infeasible: no Dirichlet draw with alpha={alpha} gave all {n_clients} clients at least "
        f"min_per_client={min_per_client} of the {n_items} items in {MAX_DIRICHLET_ATTEMPTS} attempts "
        f"(last draw's smallest client: {smallest}); raise alpha, or lower n_clients or min_per_client"
    )


def dirichlet_split(proportions: np.ndarray, n: int) -> np.ndarray:
    """Client id of each of ``n`` shuffled items, cut at ``floor(cumsum(proportions)[:-1] * n)``."""
    proportions = np.asarray(proportions, dtype=np.float64)
    if not np.isfinite(proportions).all():
        raise ValueError("Dirichlet draw produced non-finite proportions")
    cuts = np.floor(np.cumsum(proportions)[:-1] * n).astype(np.int64).clip(0, n)
    return np.searchsorted(cuts, np.arange(n), side="right").astype(np.int64)


def _quantity(
    members: list[np.ndarray],
    n_items: int,
    n_clients: int,
    sigma: float,
    min_per_client: int,
    rng: np.random.Generator,
) -> np.ndarray:
    log_weights = rng.normal(0.0, sigma, size=n_clients)
    weights = np.exp(log_weights - log_weights.max())
    sizes = min_per_client + _largest_remainder(weights, n_items - n_clients * min_per_client)
    counts = np.array([m.size for m in members], dtype=np.int64)
    table = _controlled_rounding(np.outer(sizes, counts) / n_items, sizes, counts)
    owner = np.empty(n_items, dtype=np.int64)
    for j, items in enumerate(members):
        shuffled = rng.permutation(items)
        owner[shuffled] = np.repeat(np.arange(n_clients), table[:, j])
    return owner


# --- helpers -----------------------------------------------------------------------------------


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton's method, stable ties)."""
    quota = weights / weights.sum() * total
    base = np.floor(quota).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(quota - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _controlled_rounding(target: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray) -> np.ndarray:
    """Round a non-negative matrix to integers with the given (integer) row and column sums.

    Start from the floor, add one to the cells with the largest fractional parts while their row and
    column still need items, then top up any remaining (row, column) pair that both still need items.
    Every cell ends within about one of its target.
    """
    table = np.floor(target).astype(np.int64)
    row_need = row_sums - table.sum(axis=1)
    col_need = col_sums - table.sum(axis=0)
    for flat in np.argsort(-(target - table).ravel(), kind="stable"):
        i, j = divmod(int(flat), target.shape[1])
        if row_need[i] > 0 and col_need[j] > 0:
            table[i, j] += 1
            row_need[i] -= 1
            col_need[j] -= 1
    while row_need.sum() > 0:
        i = int(np.flatnonzero(row_need > 0)[0])
        cols = np.flatnonzero(col_need > 0)
        j = int(cols[np.argmax((target - table)[i, cols])])
        table[i, j] += 1
        row_need[i] -= 1
        col_need[j] -= 1
    return table


def _check_cover(clients: Sequence[Sequence[int]], n_items: int) -> None:
    """ValueError unless the clients hold every item ``0 .. n_items - 1`` exactly once."""
    if n_items == 0:
        raise ValueError("partition holds no items")
    seen = np.zeros(n_items, dtype=np.int64)
    for client, items in enumerate(clients):
        idx = np.asarray(items, dtype=np.int64)
        outside = idx[(idx < 0) | (idx >= n_items)]
        if outside.size:
            raise ValueError(f"client {client}: item index {int(outside[0])} is outside 0..{n_items - 1}")
        np.add.at(seen, idx, 1)
    if (seen != 1).any():
        duplicated = np.flatnonzero(seen > 1)
        missing = np.flatnonzero(seen == 0)
        raise ValueError(
            f"every item must belong to exactly one client: {duplicated.size} item(s) assigned more than once "
            f"(first: {duplicated[:5].tolist()}), {missing.size} item(s) missing (first: {missing[:5].tolist()})"
        )


def _validate_categories(categories: Sequence[str]) -> list[str]:
    if isinstance(categories, (str, bytes)):
        raise ValueError("categories must be a sequence with one category name per item, not a single string")
    labels = list(categories)
    if not labels:
        raise ValueError("cannot partition an empty item list")
    bad = next((c for c in labels if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(f"category names must be strings, got {bad!r} ({type(bad).__name__})")
    return labels


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
