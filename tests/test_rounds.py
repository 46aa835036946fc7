"""The shared round engine: aggregation by hand, the in-process loop, and Flower giving the same numbers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedinspect.errors import FedinspectError
from fedinspect.federation import rounds_flower
from fedinspect.federation.fedavg import aggregate_groups, fedavg, group_of, summed
from fedinspect.federation.rounds import (
    ClientResult,
    FederatedTask,
    RoundRecorder,
    RoundsOutcome,
    run_rounds,
    task_from_spec,
)


class PullTask(FederatedTask):
    """Each client holds points; a local step moves the model ``lr`` of the way to its points' mean.

    Client ``fail`` (if set) raises a data error, as a factory with a corrupt image would.
    """

    kind = "pull"

    def __init__(self, n_clients: int = 3, rounds: int = 2, lr: float = 0.5, fail: int = -1,
                 aggregation: str = "mean", garbage: int = -1) -> None:
        self.n_clients, self.rounds, self.lr, self.fail, self.garbage = n_clients, rounds, lr, fail, garbage
        self.aggregation = aggregation  # type: ignore[misc]
        rng = np.random.default_rng(0)
        self.points = [rng.normal(size=(2 + i, 4)) for i in range(n_clients)]

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_clients": self.n_clients, "rounds": self.rounds, "lr": self.lr,
                "fail": self.fail, "aggregation": self.aggregation, "garbage": self.garbage}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> PullTask:
        return cls(spec["n_clients"], spec["rounds"], spec["lr"], spec["fail"], spec["aggregation"], spec["garbage"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"a/w": torch.zeros(4, dtype=torch.float64), "b/w": torch.ones(2, dtype=torch.float32)}

    def client_update(self, index, state, round_number, memory) -> ClientResult:
        if index == self.fail:
            raise FedinspectError(f"client_{index}: corrupt image x.png")
        mean = torch.from_numpy(self.points[index].mean(axis=0))
        arrays = {"a/w": state["a/w"] + self.lr * (mean - state["a/w"])}
        examples = {"a": len(self.points[index])}
        if index % 2 == 0:  # only even clients hold category b
            arrays["b/w"] = state["b/w"] * (index + 2)
            examples["b"] = 1
        if index == self.garbage:  # a client that sends what does not fit the global model
            arrays["a/w"] = torch.full((5,), float("nan"), dtype=torch.float64) if round_number == 1 \
                else torch.full((4,), float("nan"), dtype=torch.float64)
        visits = memory.get("visits", 0) + 1
        return ClientResult(arrays, examples, {"train_loss": float(index)}, {"visits": visits})

    def evaluate(self, state, round_number) -> dict[str, Any]:
        return {"norm": float(state["a/w"].norm())}

    def conclude(self, outcome: RoundsOutcome, out_dir, engine: str) -> dict[str, Any]:
        results = {"engine": engine, "history": outcome.history, "missing": outcome.missing,
                   "state": {k: v.tolist() for k, v in outcome.state.items()}, "memories": outcome.memories}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
        return results


def test_fedavg_of_groups_by_hand() -> None:
    one = {"a/w": torch.tensor([1.0, 2.0]), "b/w": torch.tensor([4.0])}
    two = {"a/w": torch.tensor([3.0, 6.0])}
    got = aggregate_groups([one, two], [{"a": 1, "b": 5}, {"a": 3}])
    assert torch.allclose(got["a/w"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    assert torch.equal(got["b/w"], torch.tensor([4.0]))  # only one client holds b: its model, whatever its weight
    total = aggregate_groups([one, two], [{"a": 1, "b": 5}, {"a": 3}], "sum")
    assert total["a/w"].dtype == torch.float64 and total["a/w"].tolist() == [4.0, 8.0]
    assert group_of("a/w") == "a" and group_of("fc.weight") == ""
    assert summed([{"n": torch.tensor(2)}, {"n": torch.tensor(3)}])["n"].item() == 5
    with pytest.raises(ValueError, match="groups"):
        aggregate_groups([one], [{"a": 1}])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_groups([one], [{"a": 1, "b": 1}], "median")
    with pytest.raises(ValueError, match="shapes differ"):
        fedavg([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1])


def _expected_after_rounds(task: PullTask, rounds: int) -> np.ndarray:
    """The FedAvg recursion of PullTask for group a, computed with NumPy."""
    w = np.zeros(4)
    for _ in range(rounds):
        locals_ = [w + task.lr * (p.mean(axis=0) - w) for p in task.points]
        weights = np.array([len(p) for p in task.points], dtype=float)
        w = (weights[:, None] * np.array(locals_)).sum(axis=0) / weights.sum()
    return w


def test_in_process_rounds_follow_fedavg(tmp_path: Path) -> None:
    task = PullTask(rounds=3)
    outcome = run_rounds(task, progress=False)
    assert np.allclose(outcome.state["a/w"].numpy(), _expected_after_rounds(task, 3), atol=1e-12)
    assert outcome.state["b/w"].tolist() == [27.0, 27.0]  # clients 0 and 2 send 2b and 4b: b triples per round
    assert [r["round"] for r in outcome.history] == [1, 2, 3]
    assert outcome.history[0]["bytes_per_client"] == {"client_0": 4 * 8 + 2 * 4, "client_1": 32,
                                                      "client_2": 40}
    assert outcome.memories["client_1"] == {"visits": 3}
    assert outcome.history[0]["train_loss"] == pytest.approx((0 * 3 + 1 * 3 + 2 * 5) / 11)  # weights: all examples


def test_a_failing_client_is_recorded_and_the_rounds_go_on(capsys) -> None:
    outcome = run_rounds(PullTask(fail=1), progress=False)
    assert [(m["client"], m["round"]) for m in outcome.missing] == [("client_1", 1), ("client_1", 2)]
    assert "corrupt image x.png" in outcome.missing[0]["reason"]
    assert "client_1 dropped out of round 1" in capsys.readouterr().err
    with pytest.raises(FedinspectError, match=r"round 1: only 0 of 1 clients answered.*client_0: corrupt"):
        run_rounds(PullTask(n_clients=1, fail=0), progress=False)


def test_missing_clients_are_listed_by_round_then_client_not_by_arrival(capsys) -> None:
    """Flower's workers answer in any order under load; the record must not depend on it."""
    recorder = RoundRecorder(PullTask())
    for name, round_number in [("client_10", 2), ("client_2", 1), ("client_1", 2), ("client_1", 1)]:
        recorder.drop(name, round_number, "gone")
    outcome = recorder.outcome({}, {})
    assert [(m["client"], m["round"]) for m in outcome.missing] == [("client_1", 1), ("client_2", 1),
                                                                    ("client_1", 2), ("client_10", 2)]


def test_updates_that_do_not_fit_are_refused_with_the_client_named(capsys) -> None:
    outcome = run_rounds(PullTask(n_clients=4, garbage=3), progress=False)
    reasons = [(m["client"], m["reason"]) for m in outcome.missing]
    assert reasons == [("client_3", "client_3: a/w is torch.float64 (5,), expected torch.float64 (4,)"),
                       ("client_3", "client_3: a/w holds non-finite values")]
    assert np.isfinite(outcome.state["a/w"].numpy()).all()


def test_unknown_task_kind_is_refused() -> None:
    with pytest.raises(FedinspectError, match=r"unknown federated task kind 'os\.system'"):
        task_from_spec({"kind": "os.system"})


@pytest.mark.slow
def test_flower_simulation_equals_in_process(tmp_path: Path) -> None:
    task = PullTask(n_clients=4, rounds=2, fail=1, garbage=3)
    expected = run_rounds(task, progress=False)
    results = rounds_flower.run_simulation(task, tmp_path / "run", progress=False,
                                           client_app=rounds_flower.make_client_app(PullTask.from_spec))
    assert results["engine"] == "flower-sim"
    assert results["state"] == {k: v.tolist() for k, v in expected.state.items()}
    missing = sorted((m["round"], m["client"], m["reason"]) for m in results["missing"])  # replies come in any order
    assert [(r, c) for r, c, _ in missing] == [(1, "client_1"), (1, "client_3"), (2, "client_1"), (2, "client_3")]
    assert missing == sorted((m["round"], m["client"], m["reason"]) for m in expected.missing)  # same wording
    assert results["memories"] == {"client_0": {"visits": 2}, "client_2": {"visits": 2}}
    for got, want in zip(results["history"], expected.history, strict=True):
        assert got["norm"] == want["norm"] and got["bytes_per_client"] == want["bytes_per_client"]
