"""The server refuses an update that does not fit its round, and the round goes on without that client."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from fedinspect.errors import FedinspectError
from fedinspect.federation.client import FederatedClient, RoundSettings
from fedinspect.federation.strategies import client_weights
from fedinspect.federation.update import WIRE_FORMAT, CategoryUpdate, ClientUpdate, UpdateError
from fedinspect.federation.validation import UpdateSpec, receive

# image size 64 at stride 8: 8 x 8 = 64 patches per square image, 8 x 128 = 1024 at most (aspect 16)
SPEC = UpdateSpec(categories=frozenset({"pipe_clip", "tank_screw"}), dim=8, precision="float32", image_size=64,
                  stride=8, coreset_ratio=0.1)


def honest(client: str = "client_0", samples: int = 3, seed: int = 0) -> ClientUpdate:
    """What a client with ``samples`` square images per category sends: round(0.1 * 64 * samples) rows."""
    rng = np.random.default_rng(seed)
    patches = samples * 64
    rows = round(0.1 * patches)
    return ClientUpdate(client, {name: CategoryUpdate(rng.normal(size=(rows, 8)).astype(np.float32), samples, patches)
                                 for name in ("pipe_clip", "tank_screw")})


def forge(tensors: dict[str, np.ndarray], categories: object, client: str = "client_0",
          precision: str = "float32") -> bytes:
    """Hand-made update bytes: the wire format with any content."""
    return save(tensors, metadata={"format": WIRE_FORMAT, "client_id": client, "precision": precision,
                                   "categories": json.dumps(categories)})


def rows(n: int, dim: int = 8, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, dim)).astype(dtype)


def entry(key: str = "c0", samples: object = 3, patches: object = 192) -> dict:
    return {"key": key, "n_samples": samples, "n_patches": patches}


# ---------------------------------------------------------------- what passes
@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_an_honest_update_passes_at_each_precision(precision: str) -> None:
    spec = replace(SPEC, precision=precision)
    update = receive(honest().to_bytes(precision), "client_0", spec)
    assert update.precision == precision and update.n_samples == 6 and update.n_coreset == 2 * 19


def test_real_clients_pass_in_every_mode(mvtec_category: Path) -> None:
    """The spec follows client.py's rules: plain, DP per embedding (coreset of noisy rows), DP per image."""
    images = {"widget": sorted((mvtec_category / "train" / "good").glob("*.png"))}
    base = RoundSettings(image_size=48, local_coreset_ratio=0.25)
    detector = base.detector()
    cache: dict = {}
    for changes in ({}, {"dp_unit": "embedding", "dp_noise_multiplier": 1.0},
                    {"dp_unit": "image", "dp_noise_multiplier": 1.0, "dp_clusters": 4}):
        settings = replace(base, **changes)
        update, _ = FederatedClient("client_0", images).fit(settings, detector, cache)
        spec = UpdateSpec.for_round(settings, detector, ["widget"], {"client_0": {"widget": 3}})
        assert spec.dim == 152 and spec.stride == 8 and spec.dp_clusters == changes.get("dp_clusters")
        received = receive(update.to_bytes(settings.precision), "client_0", spec)
        assert received.categories["widget"].n_samples == 3


# ---------------------------------------------------------------- what is refused, and why
def _nan() -> bytes:
    bad = honest()
    bad.categories["pipe_clip"].embeddings[0, 0] = np.nan
    return bad.to_bytes("float32")


def _scaled(scale: np.ndarray) -> bytes:
    return forge({"c0": rows(19, dtype=np.int8), "c0.scale": scale}, {"pipe_clip": entry()}, precision="int8")


MALFORMED = {
    "nan": (_nan, "non-finite embeddings"),
    "inf in float16": (lambda: forge({"c0": np.full((19, 8), np.inf, np.float16)}, {"pipe_clip": entry()},
                                     precision="float16"), "non-finite"),
    "another width": (lambda: forge({"c0": rows(19, dim=5)}, {"pipe_clip": entry()}), "width 5.*gives 8"),
    "negative n_samples": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(samples=-3)}),
                           "n_samples must be a non-negative integer"),
    "float n_samples": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(samples=1e9)}),
                        "non-negative integer"),
    "string n_patches": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(patches="192")}),
                         "non-negative integer"),
    "bool n_samples": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(samples=True)}), "non-negative integer"),
    "categories a list": (lambda: forge({"c0": rows(19)}, [entry()]), "categories must be a JSON object"),
    "categories a string": (lambda: forge({"c0": rows(19)}, "pipe_clip"), "categories must be a JSON object"),
    "entry not an object": (lambda: forge({"c0": rows(19)}, {"pipe_clip": 3}), "expected an object"),
    "missing tensor": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(key="c9")}), "tensor 'c9' is missing"),
    "tensor used twice": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(), "tank_screw": entry()}),
                          "used twice"),
    "path as a category": (lambda: forge({"c0": rows(19)}, {"../../etc": entry()}), r"unknown categories \['../../etc"),
    "no category": (lambda: forge({}, {}), "no category"),
    "someone else's id": (lambda: honest(client="client_1").to_bytes("float32"), "says it is from 'client_1'"),
    "another precision": (lambda: honest().to_bytes("float16"), "precision 'float16'"),
    "unknown precision": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry()}, precision="float64"),
                          "unknown precision"),
    "dtype not the declared one": (lambda: forge({"c0": rows(19, dtype=np.float16)}, {"pipe_clip": entry()}),
                                   "are float16, expected float32"),
    "int8 without scale": (lambda: forge({"c0": rows(19, dtype=np.int8)}, {"pipe_clip": entry()}, precision="int8"),
                           "without their scale"),
    "int8 scale of the wrong shape": (lambda: _scaled(np.ones((19,), np.float32)), r"shape \(19, 1\)"),
    "int8 scale zero": (lambda: _scaled(np.zeros((19, 1), np.float32)), "finite and positive"),
    "int8 scale nan": (lambda: _scaled(np.full((19, 1), np.nan, np.float32)), "finite and positive"),
    "more rows than the coreset rule": (lambda: forge({"c0": rows(40)}, {"pipe_clip": entry()}),
                                        "40 rows.*has 19"),
    "fewer patches than its images give": (lambda: forge({"c0": rows(6)}, {"pipe_clip": entry(patches=60)}),
                                           "n_patches 60 is impossible for 3 images"),
    "more patches than its images can give": (lambda: forge({"c0": rows(400)}, {"pipe_clip": entry(patches=4000)}),
                                              "n_patches 4000 is impossible"),
    "a billion images": (lambda: forge({"c0": rows(19)}, {"pipe_clip": entry(samples=10**9, patches=10**9)}),
                         "impossible"),
    "zero images": (lambda: forge({"c0": rows(1)}, {"pipe_clip": entry(samples=0, patches=1)}), "at least 1"),
    "header not an object": (lambda: b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "corrupt update"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_update_is_refused_with_its_reason(case: str) -> None:
    make, reason = MALFORMED[case]
    with pytest.raises(UpdateError, match=reason) as raised:
        receive(make(), "client_0", SPEC)
    assert str(raised.value).startswith("client_0: ")


def test_a_planned_client_must_report_the_plan_s_counts() -> None:
    spec = replace(SPEC, assigned={"client_0": {"pipe_clip": 3, "tank_screw": 3}})
    receive(honest().to_bytes("float32"), "client_0", spec)
    with pytest.raises(UpdateError, match="n_samples 4, the plan gave it 3"):
        receive(honest(samples=4).to_bytes("float32"), "client_0", spec)
    partial = honest()
    del partial.categories["tank_screw"]
    with pytest.raises(UpdateError, match="the plan gave it"):
        receive(partial.to_bytes("float32"), "client_0", spec)


def test_image_level_dp_sends_at_most_its_clusters() -> None:
    spec = replace(SPEC, dp_clusters=8)
    centres = {"pipe_clip": entry(samples=3, patches=192)}
    receive(forge({"c0": rows(5)}, centres), "client_0", spec)  # fewer rows than the coreset rule: fine
    with pytest.raises(UpdateError, match="9 rows, DP at the image unit sends 1 to 8"):
        receive(forge({"c0": rows(9)}, centres), "client_0", spec)


def test_self_reported_counts_cannot_buy_weight() -> None:
    """Without the checks, a client claiming 1e9 images would weigh 1.0; with them, weight costs rows."""
    liar = honest("client_1")
    for part in liar.categories.values():
        part.n_samples = part.n_patches = 10**9
    weights = client_weights([honest().categories["pipe_clip"], liar.categories["pipe_clip"]])
    assert weights[1] > 0.999999  # the attack the checks stop
    with pytest.raises(UpdateError, match="impossible"):
        receive(liar.to_bytes("float32"), "client_1", SPEC)
    # the most images 19 rows can stand for: n_patches <= 194 (round(0.1 * 195) = 20), 64 patches per image
    most = honest(samples=3)
    most.categories["pipe_clip"].n_patches = 194
    assert receive(most.to_bytes("float32"), "client_0", SPEC).categories["pipe_clip"].n_samples == 3
    most.categories["pipe_clip"].n_samples = 4
    with pytest.raises(UpdateError, match="impossible for 4 images"):
        receive(most.to_bytes("float32"), "client_0", SPEC)


# ---------------------------------------------------------------- a round with bad updates goes on (about 40 s)
def _config(clients: int, **changes):
    from fedinspect.federation.runner import FederationConfig

    return FederationConfig(clients=clients, global_size=300, centralized=False, compare_shared=False,
                            write_maps=False, settings=RoundSettings(image_size=128), **changes)


def _as_result(payload: bytes, categories: dict):
    import torch

    from fedinspect.federation.rounds import ClientResult
    from fedinspect.federation.runner import UPDATE

    return ClientResult({UPDATE: torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())}, categories)


@pytest.mark.slow
def test_bad_updates_drop_their_clients_and_the_round_goes_on(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """Nine clients on the round engine: 0 and 2 honest, 1 lies about its image counts, 3-8 (SuperNodes with
    their own data, whose counts the plan cannot pin) send garbage."""
    from fedinspect.federation.rounds import run_rounds
    from fedinspect.federation.runner import PatchCoreTask, _payload

    config = _config(9)
    cache: dict = {}
    test_cache: dict = {}
    precision = config.settings.precision

    def liar_bytes(honest_payload: bytes) -> bytes:
        liar = ClientUpdate.from_bytes(honest_payload)
        for part in liar.categories.values():
            part.n_samples = part.n_patches = 10**9
        return liar.to_bytes(precision)

    class ForgingTask(PatchCoreTask):
        own_data_liar = False

        def client_update(self, index, state, round_number, memory):
            result = super().client_update(index, state, round_number, memory)
            if index == 1:  # a billion images: as the plan's client_1, or as a SuperNode with its own data
                return _as_result(liar_bytes(_payload(result)), result.examples)
            wide = ClientUpdate("client_4", {"pipe_clip": CategoryUpdate(rows(10, dim=100), 1, 100)})
            forged = {
                3: _nan(),
                4: wide.to_bytes(precision),
                5: forge({"c0": rows(19)}, {"pipe_clip": entry(samples=-1)}, client="client_5"),
                6: forge({"c0": rows(19)}, ["pipe_clip"], client="client_6"),
                7: forge({"c0": rows(19, dtype=np.float16)}, {"../../etc": entry()}, client="client_7",
                         precision=precision),
                8: liar_bytes(_payload(super().client_update(1, state, round_number, memory))),  # client_1's bytes
            }
            return _as_result(forged[index], result.examples) if index in forged else result

    def run(name: str, task: PatchCoreTask) -> dict:
        return task.conclude(run_rounds(task, progress=False), tmp_path / name, "in-process")

    clean = run("clean", PatchCoreTask(tiny_dataset, config, cache=cache, test_cache=test_cache, report=False))
    assert [c["client"] for c in clean["clients"]] == [f"client_{i}" for i in range(9)]
    attacking = ForgingTask(tiny_dataset, config, cache=cache, test_cache=test_cache, report=False)
    attacking.own_data_clients = frozenset(f"client_{i}" for i in range(3, 9))  # as SuperNodes with their own data
    attacked = run("attacked", attacking)
    assert [c["client"] for c in attacked["clients"]] == ["client_0", "client_2"]
    kept = [c for c in clean["clients"] if c["client"] in ("client_0", "client_2")]
    assert attacked["stages"]["raw_patches"] == sum(c["patches"] for c in kept)
    held = {category for c in kept for category in c["categories"]}  # a category no answering client holds: no bank
    assert set(attacked["categories"]) == held
    assert set(attacked.get("not_evaluated", {})) == set(clean["categories"]) - held
    reasons = {m["client"]: m["reason"] for m in attacked["missing_clients"]}
    assert set(reasons) == {f"client_{i}" for i in (1, 3, 4, 5, 6, 7, 8)}
    assert "the plan gave it" in reasons["client_1"] and "non-finite" in reasons["client_3"]
    assert "width 100" in reasons["client_4"] and "non-negative integer" in reasons["client_5"]
    assert "JSON object" in reasons["client_6"] and "../../etc" in reasons["client_7"]
    assert "says it is from 'client_1'" in reasons["client_8"]
    err = capsys.readouterr().err
    assert all(f"warning: {name} dropped out" in err for name in reasons)
    # the refused updates left no trace: the round is the one where those clients never answered

    class AbsentTask(PatchCoreTask):
        def client_update(self, index, state, round_number, memory):
            if index not in (0, 2):
                raise FedinspectError(f"client_{index}: away")
            return super().client_update(index, state, round_number, memory)

    absent = run("absent", AbsentTask(tiny_dataset, config, cache=cache, test_cache=test_cache, report=False))
    assert attacked["categories"] == absent["categories"] and attacked["stages"] == absent["stages"]

    # a SuperNode with its own data: the plan cannot pin its counts, the rows it sent still do
    own = ForgingTask(tiny_dataset, config, cache=cache, test_cache=test_cache, report=False)
    own.own_data_clients = frozenset({"client_1"})
    with pytest.raises(UpdateError, match=r"client_1: update rejected: .*impossible"):
        own.check_update("client_1", own.client_update(1, {}, 1, {}), {})

    too_few = ForgingTask(tiny_dataset, _config(9, min_clients=3), cache=cache, test_cache=test_cache, report=False)
    with pytest.raises(FedinspectError, match=r"only 2 of 9 clients answered \(minimum 3\).*the plan gave it"):
        run("too_few", too_few)
