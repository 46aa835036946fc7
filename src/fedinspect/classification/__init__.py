"""Federated defect classification with DP-SGD and image obfuscation (the PIDS system of seed 000).

Modules: :mod:`.data` (labelled view, split, client shares, image tensors), :mod:`.models` (small CNN
and transfer models), :mod:`.training` (local training, Opacus DP-SGD), :mod:`.runner` (the run's
config, model inputs, :func:`~.runner.run_classification` in process and
:func:`~.runner.run_flower_simulation` on Flower), :mod:`.task` (the classification task that the
shared round engine :mod:`fedinspect.federation.rounds` drives: client round, evaluation, results),
:mod:`.experiment` (Tables I and III of the seed) and :mod:`.report` (plots and reports). FedAvg
itself is :mod:`fedinspect.federation.fedavg`.
"""
