"""Aggregation of model updates: federated averaging of weights, and plain sums of statistics.

FedAvg (McMahan et al., 2017): the global model is the mean of the clients' models weighted by their
numbers of training images. FedProx (Li et al., 2020) aggregates the same way; its proximal term acts
in the clients' local training. One-round statistics (PaDiM's counts, sums and sums of outer
products) are added up instead.

Updates may hold several independent models, one per *group* (a category): a key ``"group/name"``
belongs to ``group``, a key without ``/`` to the group ``""``. Each group is averaged over the clients
that sent it, weighted by that client's examples of that group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

AGGREGATIONS = ("mean", "sum")


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k w_k * state_k / sum_k w_k`` for every floating-point tensor (computed in float64, stored in
    the tensor's dtype); integer buffers (e.g. BatchNorm's ``num_batches_tracked``) take the largest value.

    Raises:
        ValueError: no states, weights that do not match or are not positive, or states with different keys
            or shapes.
    """
    if not states:
        raise ValueError("FedAvg needs at least one client model")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} client models but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = _same_keys(states)
    total = float(sum(weights))
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = _same_shapes(states, key)
        if tensors[0].is_floating_point():
            mean = sum(float(w) / total * t.double() for w, t in zip(weights, tensors, strict=True))
            averaged[key] = mean.to(tensors[0].dtype)
        else:
            averaged[key] = torch.stack(tensors).max(dim=0).values
    return averaged


def summed(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The key-wise sum of the states (float64 for floating-point tensors, as statistics need)."""
    if not states:
        raise ValueError("a sum needs at least one client update")
    keys = _same_keys(states)
    return {key: sum(t.double() if t.is_floating_point() else t for t in _same_shapes(states, key))
            for key in keys}


def group_of(key: str) -> str:
    """The group (model) a key belongs to: the text before its first ``/``, or ``""``."""
    return key.split("/", 1)[0] if "/" in key else ""


def aggregate_groups(states: Sequence[Mapping[str, torch.Tensor]], examples: Sequence[Mapping[str, int]],
                     how: str = "mean") -> dict[str, torch.Tensor]:
    """Aggregate each group over the clients that sent it: FedAvg weighted by ``examples[k][group]``
    (``how="mean"``) or the plain sum (``how="sum"``).

    Raises:
        ValueError: an unknown ``how``, a client whose examples do not name exactly the groups it sent, or
            what :func:`fedavg` / :func:`summed` refuse.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if len(states) != len(examples):
        raise ValueError(f"{len(states)} client updates but {len(examples)} example counts")
    per_group: dict[str, list[tuple[dict[str, torch.Tensor], int]]] = {}
    for index, (state, counts) in enumerate(zip(states, examples, strict=True)):
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            groups.setdefault(group_of(key), {})[key] = tensor
        if set(groups) != set(counts):
            raise ValueError(f"client update {index} sends groups {sorted(groups)} but counts examples of "
                             f"{sorted(counts)}")
        for group, part in groups.items():
            per_group.setdefault(group, []).append((part, int(counts[group])))
    result: dict[str, torch.Tensor] = {}
    for group in sorted(per_group):
        parts = [part for part, _ in per_group[group]]
        result.update(summed(parts) if how == "sum" else fedavg(parts, [n for _, n in per_group[group]]))
    return result


def _same_keys(states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    keys = list(states[0])
    for k, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client model {k} has other parameters than client model 0")
    return keys


def _same_shapes(states: Sequence[Mapping[str, torch.Tensor]], key: str) -> list[torch.Tensor]:
    tensors = [state[key] for state in states]
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"parameter {key}: shapes differ across clients {[tuple(t.shape) for t in tensors]}")
    return tensors
