"""PaDiM federated in one round: every client sends its statistics per category, the server adds them.

Each client computes, per category it holds, the count, sum and sum of outer products of its images'
selected features at every grid position (:meth:`Padim.statistics`); the server adds them and forms the
same Gaussians as fitting on the pooled images (:meth:`Padim.set_statistics`): exact up to float
rounding, for any partition. Every client uses the federation's seed, so all select the same feature
channels; the grid follows from the category's aspect ratio, which the server reads off its test images.

With ``privacy`` set, each client clips every image's features and adds Gaussian noise
(:mod:`fedinspect.privacy.statistics_dp`): its share of one release (``distributed``, which assumes the
server sees only the sum: secure aggregation) or the full noise (``local``). The image counts are then
not sent in the clear (``examples`` are 0): only the noisy count inside the statistics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinspect.detectors.padim import Padim, PadimStatistics
from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.client import derived_seed
from fedinspect.federation.detector_task import CategoryTask, DetectorFederationConfig
from fedinspect.federation.rounds import ClientResult, RoundsOutcome, State, client_id

SENT = ("count", "sum", "sum_outer")  # the grid shape is public: never summed


class StatisticsTask(CategoryTask):
    """One round of summed PaDiM statistics (see the module docstring)."""

    kind = "padim_statistics"
    aggregation = "sum"

    def __init__(self, data_dir: str | Path, config: DetectorFederationConfig, progress: bool = False) -> None:
        if config.detector != "padim":
            raise FedinspectError(f"one round of statistics federates PaDiM, not {config.detector}")
        super().__init__(data_dir, config, progress)
        self.rounds = 1
        self.privacy = config.statistics_privacy()
        self._grids: dict[str, tuple[int, int]] = {}
        self._padim: Padim | None = None

    def padim(self) -> Padim:
        """The federation's PaDiM (its seed selects the channels every client uses); loaded once."""
        if self._padim is None:
            self._padim = self.detector()
        return self._padim

    def grid(self, group: str) -> tuple[int, int]:
        """The feature grid of a model's images, from the aspect ratio of each of its categories' first test
        image (public); one model's categories must share it (``keep_aspect_ratio=False`` stretches them)."""
        if group not in self._grids:
            grids = {}
            for category, dataset in self.datasets.items():
                if self.group_of(category) == group:
                    grids[category] = self.padim().grid_shape(dataset.load_image(dataset.test[0]).shape[:2])
            if len(set(grids.values())) > 1:
                raise SettingsError(f"one PaDiM for {sorted(grids)} needs one feature grid, but their images give "
                                    f"{grids}: stretch them to squares (keep_aspect_ratio false)")
            self._grids[group] = next(iter(grids.values()))
        return self._grids[group]

    def initial_state(self) -> State:
        """Nothing to send; the server checks now, before any client works, that each model has one grid."""
        for group in self.groups:
            self.grid(group)
        return {}

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        from fedinspect.privacy.statistics_dp import private_statistics

        name = client_id(index)
        arrays: State = {}
        examples: dict[str, int] = {}
        for group in self.client_groups(index):
            images = self.client_images(index, group)
            try:
                if self.privacy is None:
                    stats = self.padim().statistics(images, total=len(images))
                else:
                    stats = private_statistics(self.padim(), images, self.privacy, self.n_clients,
                                               seed=derived_seed(self.config.seed, name, group, "dp"),
                                               total=len(images))
            except FedinspectError as error:
                raise FedinspectError(f"{name}, {group}: {error}") from error
            sent = stats.to_arrays()
            arrays.update({f"{group}/{key}": torch.from_numpy(np.asarray(sent[key])) for key in SENT})
            examples[group] = 0 if self.privacy is not None else len(images)
        return ClientResult(arrays, examples, {}, dict(memory))

    def check_update(self, name: str, result: ClientResult, state: State) -> None:
        """Per category: exactly count, sum and sum of outer products, of the category's grid and PaDiM's width."""
        super().check_update(name, result, state)
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key, value in result.arrays.items():
            group, _, part = key.partition("/")
            if group not in self.groups:
                raise FedinspectError(f"{name}: statistics of an unknown category {group!r}")
            groups.setdefault(group, {})[part] = value.numpy()
        for group, parts in groups.items():
            self._statistics(parts, group, f"{name}, {group}")

    def _statistics(self, parts: Mapping[str, np.ndarray], group: str, sender: str) -> PadimStatistics:
        if set(parts) != set(SENT):
            raise FedinspectError(f"{sender}: expected {list(SENT)}, got {sorted(parts)}")
        grid = self.grid(group)
        arrays = {**parts, "grid_shape": np.asarray(grid, dtype=np.float64)}
        return PadimStatistics.from_arrays(arrays, noisy=self.privacy is not None, grid_shape=grid,
                                           n_features=self.padim().n_features, sender=sender)

    def global_detector(self, state: State, category: str) -> Padim:
        group = self.group_of(category) if category in self.datasets else category
        prefix = f"{group}/"
        stats = self._statistics({key[len(prefix):]: value.numpy() for key, value in state.items()
                                  if key.startswith(prefix)}, group, f"sum of {group}")
        model = self.detector()
        if self.privacy is not None:
            from fedinspect.privacy.statistics_dp import set_noisy_statistics

            return set_noisy_statistics(model, stats, clip_norm=self.privacy.clip_norm)
        return model.set_statistics(stats.count, stats.sum, stats.sum_outer, stats.grid_shape)

    def local_model(self, index: int, group: str) -> Padim:
        """Client ``index``'s PaDiM from its own images (it needs no noise to keep them at home)."""
        return self.detector().fit(self.client_images(index, group))

    # ---------------------------------------------------------------- secure aggregation (Flower)
    @property
    def secure(self) -> bool:
        return self.config.secure

    def secure_settings(self) -> Any:
        """The public parameters of the secure sum: per category (sorted), count, sum and sum of outer products
        with their bounds from the largest share of a client (public: the plan) and the feature bound."""
        from fedinspect.federation.secure_sum import ArraySpec, SecureSumSettings

        bound = self.privacy.clip_norm if self.privacy is not None else self.config.secure_bound
        k = self.padim().n_features
        specs = []
        for group in self.groups:
            most = max(sum(len(positions) for category, positions in self.client_categories(i).items()
                           if self.group_of(category) == group) for i in range(self.n_clients))
            positions = self.grid(group)[0] * self.grid(group)[1]
            count_bound = most + (10 * self.privacy.resolved_noise_multiplier() if self.privacy is not None else 0)
            specs += [ArraySpec((1,), max(1, count_bound), integer=self.privacy is None, name=f"{group}/count"),
                      ArraySpec((positions, k), max(1, most) * bound, name=f"{group}/sum"),
                      ArraySpec((positions, k, k), max(1, most) * bound**2, name=f"{group}/sum_outer")]
        layout = [[spec.name, list(spec.shape)] for spec in specs]  # sent to the clients: they know no grid
        return SecureSumSettings(tuple(specs), seed=self.config.seed, client_config={"arrays": json.dumps(layout)})

    def secure_arrays(self, index: int, config: Mapping[str, Any]) -> list[np.ndarray]:
        """Client ``index``'s statistics in the order and shapes the server announced (``config["arrays"]``,
        from :meth:`secure_settings`); zeros for a model it holds no image of."""
        result = self.client_update(index, {}, 1, {})
        return [result.arrays[name].numpy().reshape(shape) if name in result.arrays else np.zeros(shape)
                for name, shape in json.loads(str(config["arrays"]))]

    def state_from_sum(self, arrays: list[np.ndarray]) -> State:
        """The global state from the secure sum, leaving out categories no client held (a zero count)."""
        state: State = {}
        specs = self.secure_settings().specs
        for spec, value in zip(specs, arrays, strict=True):
            group = spec.name.split("/", 1)[0]
            if float(arrays[[s.name for s in specs].index(f"{group}/count")].sum()) > 0:
                value = np.asarray(value, dtype=np.float64).reshape(() if spec.name.endswith("/count") else spec.shape)
                if spec.name.endswith("/sum_outer"):  # each entry was rounded on its own: symmetrize
                    value = (value + value.transpose(0, 2, 1)) / 2
                state[spec.name] = torch.from_numpy(value)
        return state

    def extra_results(self, outcome: RoundsOutcome) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.privacy is not None:
            extra["privacy"] = self.privacy.report(self.n_clients)
        if outcome.secure_aggregation:
            extra["secure_aggregation"] = outcome.secure_aggregation
        return extra
