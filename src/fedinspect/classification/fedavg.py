"""Federated averaging (McMahan et al., 2017): the global model is the mean of the clients' models
weighted by their numbers of training images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


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
    keys = list(states[0])
    for k, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client model {k} has other parameters than client model 0")
    total = float(sum(weights))
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [state[key] for state in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"parameter {key}: shapes differ across clients {[tuple(t.shape) for t in tensors]}")
        if tensors[0].is_floating_point():
            mean = sum(float(w) / total * t.double() for w, t in zip(weights, tensors, strict=True))
            averaged[key] = mean.to(tensors[0].dtype)
        else:
            averaged[key] = torch.stack(tensors).max(dim=0).values
    return averaged
