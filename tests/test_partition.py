"""Partitioners of training images over federated clients (fedinspect.federation.partition)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedinspect.federation.partition import SCHEMES, Partition, dirichlet_split, partition

AUTOVI = {
    "engine_wiring": 285,
    "pipe_clip": 195,
    "pipe_staple": 191,
    "tank_screw": 318,
    "underbody_pipes": 161,
    "underbody_screw": 373,
}
NAMES = sorted(AUTOVI)


def autovi_categories(interleave: bool = False) -> list[str]:
    """One category label per AutoVI training image (1,523); optionally in a mixed, non-grouped order."""
    labels = [name for name, count in AUTOVI.items() for _ in range(count)]
    if interleave:
        labels = [labels[i] for i in np.random.default_rng(123).permutation(len(labels))]
    return labels


def count_matrix(p: Partition, labels: list[str]) -> np.ndarray:
    """Clients x categories (sorted names) item counts."""
    counts = p.counts(labels)
    return np.array([[counts[c][name] for name in NAMES] for c in range(p.n_clients)])


def global_mix() -> np.ndarray:
    totals = np.array([AUTOVI[name] for name in NAMES], dtype=float)
    return totals / totals.sum()


def mean_tv_to_global(p: Partition, labels: list[str]) -> float:
    """Mean over non-empty clients of the total-variation distance of their category mix to the global one."""
    matrix = count_matrix(p, labels).astype(float)
    matrix = matrix[matrix.sum(axis=1) > 0]
    mixes = matrix / matrix.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(mixes - global_mix()).sum(axis=1).mean())


SCHEME_CASES = [
    ("iid", {}),
    ("category", {}),
    ("category", {"categories_per_client": 2}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 100.0}),
    ("quantity", {"quantity_sigma": 1.0}),
]


# --- every scheme ------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEME_CASES)
@pytest.mark.parametrize("n_clients", [1, 3, 5, 12])
def test_every_item_assigned_exactly_once(scheme: str, kwargs: dict, n_clients: int) -> None:
    labels = autovi_categories(interleave=True)
    if n_clients * kwargs.get("categories_per_client", len(NAMES)) < len(NAMES):
        with pytest.raises(ValueError, match="infeasible"):  # some category would have no client
            partition(labels, n_clients, scheme, seed=4, **kwargs)
        return
    p = partition(labels, n_clients, scheme, seed=4, **kwargs)
    assert p.scheme == scheme
    assert p.n_clients == n_clients == len(p.assignments)
    flat = [i for items in p.assignments for i in items]
    assert sorted(flat) == list(range(len(labels)))
    assert all(list(items) == sorted(items) for items in p.assignments)
    assert all(len(items) >= 1 for items in p.assignments)  # default min_per_client=1
    owner = p.client_of()
    assert owner.shape == (len(labels),)
    for client, items in enumerate(p.assignments):
        assert (owner[list(items)] == client).all()
    assert sum(p.sizes()) == p.n_items == len(labels)


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEME_CASES)
def test_same_seed_gives_identical_partition(scheme: str, kwargs: dict) -> None:
    labels = autovi_categories(interleave=True)
    assert partition(labels, 5, scheme, seed=11, **kwargs) == partition(labels, 5, scheme, seed=11, **kwargs)


@pytest.mark.parametrize(
    ("scheme", "n_clients", "kwargs"),
    [
        ("iid", 5, {}),
        ("dirichlet", 5, {"alpha": 0.5}),
        ("quantity", 5, {}),
        ("category", 12, {}),  # categories split among clients: the split is shuffled
    ],
)
def test_different_seed_gives_different_partition(scheme: str, n_clients: int, kwargs: dict) -> None:
    labels = autovi_categories()
    a = partition(labels, n_clients, scheme, seed=0, **kwargs)
    b = partition(labels, n_clients, scheme, seed=1, **kwargs)
    assert a.assignments != b.assignments


def test_whole_category_grouping_varies_with_seed_through_client_ids() -> None:
    # With whole categories (n_clients <= n_categories) the seed decides which client gets which group.
    labels = autovi_categories()
    distinct = {partition(labels, 3, "category", seed=s).assignments for s in range(8)}
    assert len(distinct) > 1


# --- iid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleave", [False, True])
def test_iid_on_autovi_reproduces_reference_sizes(interleave: bool) -> None:
    labels = autovi_categories(interleave)
    p = partition(labels, 5, "iid", seed=0)
    assert sorted(p.sizes(), reverse=True) == [305, 305, 305, 304, 304]
    matrix = count_matrix(p, labels)
    assert (matrix >= 1).all()  # every client holds every category
    assert (matrix.max(axis=0) - matrix.min(axis=0) <= 1).all()  # balanced within each category
    assert matrix.sum(axis=0).tolist() == [AUTOVI[name] for name in NAMES]


@pytest.mark.parametrize("n_clients", [2, 7, 12, 40])
def test_iid_sizes_differ_by_at_most_one(n_clients: int) -> None:
    labels = autovi_categories()
    p = partition(labels, n_clients, "iid", seed=3)
    sizes = p.sizes()
    assert max(sizes) - min(sizes) <= 1
    matrix = count_matrix(p, labels)
    assert (matrix.max(axis=0) - matrix.min(axis=0) <= 1).all()


def test_iid_small_category_goes_to_some_clients_only() -> None:
    labels = ["a"] * 10 + ["b"] * 2
    p = partition(labels, 4, "iid", seed=0)
    counts = p.counts(labels)
    assert all(counts[c]["a"] >= 2 for c in range(4))
    assert sum(counts[c]["b"] for c in range(4)) == 2
    assert max(p.sizes()) - min(p.sizes()) <= 1


# --- category ----------------------------------------------------------------------------------


def test_category_three_clients_each_category_belongs_to_one_client() -> None:
    labels = autovi_categories(interleave=True)
    p = partition(labels, 3, "category", seed=0)
    matrix = count_matrix(p, labels)
    assert ((matrix > 0).sum(axis=0) == 1).all()  # each category on exactly one client
    assert (matrix.sum(axis=0) == [AUTOVI[n] for n in NAMES]).all()  # and whole
    # Greedy (LPT) balancing by image count: 373+161, 318+191, 285+195.
    assert sorted(p.sizes(), reverse=True) == [534, 509, 480]


def test_category_as_many_clients_as_categories_one_each() -> None:
    labels = autovi_categories()
    p = partition(labels, 6, "category", seed=2)
    matrix = count_matrix(p, labels)
    assert ((matrix > 0).sum(axis=1) == 1).all()
    assert sorted(p.sizes()) == sorted(AUTOVI.values())


def test_category_twelve_clients_each_holds_one_category_in_equal_shares() -> None:
    labels = autovi_categories(interleave=True)
    p = partition(labels, 12, "category", seed=0)
    matrix = count_matrix(p, labels)
    assert ((matrix > 0).sum(axis=1) == 1).all()  # each client exactly one category
    assert ((matrix > 0).sum(axis=0) >= 1).all()  # every category made somewhere
    for j in range(len(NAMES)):
        shares = matrix[matrix[:, j] > 0, j]
        assert shares.max() - shares.min() <= 1  # near-equal disjoint shares
    # Makers go to the category whose makers have the largest share: the biggest share is minimal.
    assert max(p.sizes()) == 161


def test_category_split_shares_are_shuffled_not_runs_of_the_input_order() -> None:
    # Items grouped by category in the caller's order (e.g. by file name): a split must not hand one
    # client the first half and another the second half, which could correlate with acquisition time.
    labels = autovi_categories()
    p = partition(labels, 12, "category", seed=0)
    split = [items for items in p.assignments if len(items) < AUTOVI[labels[items[0]]]]
    assert len(split) == 11  # underbody_pipes (161) stays whole, the others are split
    assert not any(items[-1] - items[0] + 1 == len(items) for items in split)


@pytest.mark.parametrize("n_clients", [3, 5, 12])
def test_category_fixed_categories_per_client(n_clients: int) -> None:
    labels = autovi_categories()
    p = partition(labels, n_clients, "category", seed=1, categories_per_client=2)
    assert p.params == {"categories_per_client": 2}
    matrix = count_matrix(p, labels)
    assert ((matrix > 0).sum(axis=1) == 2).all()  # each client makes exactly 2 categories
    assert (matrix.sum(axis=0) == [AUTOVI[n] for n in NAMES]).all()  # every image somewhere, once
    if n_clients == 3:
        assert ((matrix > 0).sum(axis=0) == 1).all()  # 6 slots for 6 categories: none shared


@pytest.mark.parametrize(
    ("n_clients", "per_client", "match"),
    [
        (3, 1, "cover at most 3 of the 6 categories"),
        (3, 7, r"categories_per_client must be an integer in 1\.\.6"),
        (3, 0, r"categories_per_client must be an integer in 1\.\.6"),
    ],
)
def test_category_infeasible_categories_per_client(n_clients: int, per_client: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(autovi_categories(), n_clients, "category", categories_per_client=per_client)


def test_category_too_few_items_for_the_requested_sharing() -> None:
    # 3 categories of 1 item each cannot be made by 2 clients each.
    with pytest.raises(ValueError, match="allow only 3"):
        partition(["a", "b", "c"], 3, "category", categories_per_client=2)


def test_category_min_per_client_violation_is_reported() -> None:
    with pytest.raises(ValueError, match="fewer than min_per_client=200"):
        partition(autovi_categories(), 6, "category", min_per_client=200)  # underbody_pipes has 161


# --- dirichlet ---------------------------------------------------------------------------------


def test_dirichlet_small_alpha_is_much_more_skewed_than_large_alpha() -> None:
    labels = autovi_categories(interleave=True)
    for seed in range(5):
        skewed = mean_tv_to_global(partition(labels, 10, "dirichlet", seed, alpha=0.1), labels)
        near_iid = mean_tv_to_global(partition(labels, 10, "dirichlet", seed, alpha=100.0), labels)
        assert skewed > 0.4, (seed, skewed)
        assert near_iid < 0.1, (seed, near_iid)
    iid = mean_tv_to_global(partition(labels, 10, "iid", 0), labels)
    assert iid < 0.02


def test_dirichlet_counts_follow_the_documented_draws() -> None:
    labels = autovi_categories(interleave=True)
    n_clients, alpha, seed = 7, 0.3, 5
    p = partition(labels, n_clients, "dirichlet", seed, alpha=alpha, min_per_client=0)  # first draw accepted
    rng = np.random.default_rng(seed)
    members = {name: [i for i, c in enumerate(labels) if c == name] for name in NAMES}
    owner = p.client_of()
    for name in NAMES:
        proportions = rng.dirichlet(np.full(n_clients, alpha))
        order = rng.permutation(members[name])
        n = len(order)
        cuts = np.floor(np.cumsum(proportions)[:-1] * n).astype(int)
        expected = np.diff(np.concatenate([[0], cuts, [n]]))
        got = np.bincount(owner[members[name]], minlength=n_clients)
        assert got.tolist() == expected.tolist()
        assert np.abs(got / n - proportions).max() <= 1.0 / n + 1e-12  # shares track the draw
        assert owner[order].tolist() == dirichlet_split(proportions, n).tolist()  # same shuffled order


def test_dirichlet_split_cuts_by_cumulative_proportions() -> None:
    assert dirichlet_split(np.array([0.5, 0.25, 0.25]), 8).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert dirichlet_split(np.array([0.0, 1.0, 0.0]), 3).tolist() == [1, 1, 1]
    assert dirichlet_split(np.array([1.0]), 4).tolist() == [0, 0, 0, 0]


def test_dirichlet_min_per_client_is_enforced_by_redrawing() -> None:
    labels = autovi_categories()
    violated = 0
    for seed in range(5):
        free = partition(labels, 10, "dirichlet", seed, alpha=0.1, min_per_client=0)
        violated += min(free.sizes()) < 30
        bounded = partition(labels, 10, "dirichlet", seed, alpha=0.1, min_per_client=30)
        assert min(bounded.sizes()) >= 30
        assert bounded.params == {"alpha": 0.1, "min_per_client": 30}
    assert violated > 0  # the constraint actually had to act


def test_dirichlet_infeasible_minimum_raises_after_bounded_attempts() -> None:
    with pytest.raises(ValueError, match=r"infeasible: no Dirichlet draw with alpha=0\.01 .* 50 clients"):
        partition(autovi_categories(), 50, "dirichlet", 0, alpha=0.01, min_per_client=20)


# --- quantity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_quantity_unequal_sizes_with_global_category_mix(seed: int) -> None:
    labels = autovi_categories(interleave=True)
    p = partition(labels, 10, "quantity", seed, quantity_sigma=1.0)
    sizes = np.array(p.sizes(), dtype=float)
    assert sizes.std() / sizes.mean() > 0.2
    assert sizes.min() >= 1
    matrix = count_matrix(p, labels).astype(float)
    for row in matrix[matrix.sum(axis=1) >= 50]:
        tv = 0.5 * np.abs(row / row.sum() - global_mix()).sum()
        assert tv < 0.15
    # Each cell within a couple of images of its proportional target.
    target = np.outer(sizes, [AUTOVI[n] for n in NAMES]) / len(labels)
    assert np.abs(matrix - target).max() < 2.0


def test_quantity_zero_sigma_is_balanced_and_min_per_client_is_respected() -> None:
    labels = autovi_categories()
    flat = partition(labels, 5, "quantity", 0, quantity_sigma=0.0)
    assert sorted(flat.sizes(), reverse=True) == [305, 305, 305, 304, 304]
    skewed = partition(labels, 20, "quantity", 3, quantity_sigma=3.0, min_per_client=40)
    assert min(skewed.sizes()) >= 40
    assert min(partition(labels, 20, "quantity", 3, quantity_sigma=3.0, min_per_client=1).sizes()) < 40


# --- counts, JSON ------------------------------------------------------------------------------


def test_counts_lists_every_category_per_client() -> None:
    labels = ["b", "a", "b", "c"]
    p = Partition("iid", 2, 0, {}, ((0, 2), (1, 3)))
    assert p.counts(labels) == {0: {"a": 0, "b": 2, "c": 0}, 1: {"a": 1, "b": 0, "c": 1}}
    assert p.client_of().tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="got 3 categories for a partition of 4 items"):
        p.counts(labels[:3])


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEME_CASES)
def test_json_round_trip(scheme: str, kwargs: dict, tmp_path: Path) -> None:
    p = partition(autovi_categories(interleave=True), 5, scheme, seed=9, **kwargs)
    assert Partition.from_json(json.loads(json.dumps(p.to_json()))) == p
    path = p.save(tmp_path / "sub" / "partition.json")
    loaded = Partition.load(path)
    assert loaded == p
    assert loaded.params == p.params and loaded.seed == 9 and loaded.scheme == scheme
    assert hash(loaded) == hash(p)


def test_load_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "fedinspect-partition", "assignments": [[0, 1', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json.*bad JSON"):
        Partition.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"broken\.json"):
        Partition.load(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["assignments"][0].pop(), r"1 item\(s\) missing"),
        (lambda d: d["assignments"][1].append(d["assignments"][0][0]), r"assigned more than once"),
        (lambda d: d["assignments"].pop(), "assignments has 2 clients but n_clients is 3"),
        (lambda d: d.update(n_items=99), r"91 item\(s\) missing"),
        (lambda d: d.update(n_items="8"), "'n_items' must be a positive integer"),
        (lambda d: d.update(format="something-else"), "not a partition"),
        (lambda d: d.pop("seed"), "missing field"),
        (lambda d: d["assignments"][0].append("x"), "item indices must be integers"),
    ],
)
def test_load_inconsistent_file_names_the_file(edit, match: str, tmp_path: Path) -> None:
    p = partition(list("aabbccdd"), 3, "iid", seed=0)
    data = p.to_json()
    edit(data)
    path = tmp_path / "bad_partition.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_partition\.json") as info:
        Partition.load(path)
    assert info.match(match)


def test_partition_constructor_validates_coverage() -> None:
    with pytest.raises(ValueError, match="more than once"):
        Partition("iid", 2, 0, {}, ((0, 1), (1,)))
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        Partition("iid", 2, 0, {}, ((0, 1), (5,)))


# --- argument validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((["a", "b"], 0), {}, "n_clients must be an integer >= 1"),
        ((["a", "b"], 2.0), {}, "n_clients must be an integer >= 1"),
        ((["a", "b"], 3), {}, r"more clients \(3\) than items \(2\)"),
        (([], 1), {}, "empty item list"),
        (("abc", 1), {}, "not a single string"),
        (([1, 2], 1), {}, "category names must be strings"),
        ((["a", "b"], 1, "random"), {}, "unknown partition scheme 'random'; valid schemes: iid, category, dirichlet"),
        ((["a", "b"], 1, "dirichlet"), {"alpha": 0.0}, "alpha .* must be a finite number > 0"),
        ((["a", "b"], 1, "dirichlet"), {"alpha": -1.0}, "alpha .* must be a finite number > 0"),
        ((["a", "b"], 1, "dirichlet"), {"alpha": float("nan")}, "alpha .* must be a finite number > 0"),
        ((["a", "b"], 1, "quantity"), {"quantity_sigma": -0.5}, "quantity_sigma must be a finite number >= 0"),
        ((["a", "b"], 1, "iid", -1), {}, "seed must be a non-negative integer"),
        ((["a", "b"], 1), {"min_per_client": -1}, "min_per_client must be an integer >= 0"),
        ((["a", "b", "c"], 2), {"min_per_client": 2}, r"infeasible: 2 clients x min_per_client=2"),
        ((["a", "b"], 1, "iid"), {"categories_per_client": 1}, "applies only to scheme 'category'"),
    ],
)
def test_bad_arguments_raise_helpful_value_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(*args, **kwargs)


def test_schemes_constant() -> None:
    assert SCHEMES == ("iid", "category", "dirichlet", "quantity")
