"""Federated defect classification with DP-SGD and image obfuscation (the PIDS system of seed 000).

Modules: :mod:`.data` (labelled view, split, client shares, image tensors), :mod:`.models` (small CNN
and transfer models), :mod:`.training` (local training, Opacus DP-SGD), :mod:`.fedavg` (weighted
averaging), :mod:`.runner` (in-process federation), :mod:`.flower_app` (the same on Flower),
:mod:`.experiment` (Tables I and III of the seed) and :mod:`.report` (plots and reports).
"""
