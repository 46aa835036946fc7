"""STUDY.toml: which federated runs a study makes, and every cell's FederationConfig.

A study file has three tables::

    [study]
    name = "fairness"
    synthetic = "small"          # generate `fedinspect synth --size small` into OUT/data (or: data = "DIR")
    synthetic_seed = 0
    seeds = [0, 1, 2]            # every random choice of a cell (partition, coresets) takes its seed
    baseline = "federated_coreset"   # the strategy the others are tested against
    situation = "partition"      # the grid axis that describes the situation (fronts and advice per level)
    cell_reports = false         # also write each cell's report.md / report.html (slower)

    [options]                    # FederationConfig / RoundSettings fields shared by every cell
    clients = 5
    image_size = 128
    global_ratio = 0.01

    [grid]                       # one axis per key; a cell per combination (times the seeds)
    strategy = ["federated_coreset", "fair_coreset"]
    partition = [
        { name = "category", partition = "category" },
        { name = "dirichlet-0.1", partition = "dirichlet", alpha = 0.1 },
    ]

An axis level is a value of the option named like the axis, or a table of several options (its
``name``, if given, labels it; otherwise its values do). Option names are the fields of
:class:`~fedinspect.federation.runner.FederationConfig` and
:class:`~fedinspect.federation.client.RoundSettings` (``seed`` comes from ``seeds``). Every cell's
configuration is built and checked when the file is read, so a typo or a bad value fails at once,
with the file, the cell and the option named.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedinspect.errors import FedinspectError
from fedinspect.federation.client import RoundSettings
from fedinspect.federation.partition import SCHEMES
from fedinspect.federation.poisoning import ATTACKS
from fedinspect.federation.runner import FederationConfig
from fedinspect.federation.server import BANK_MODES
from fedinspect.federation.strategies import STRATEGIES
from fedinspect.federation.update import PRECISIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

STUDY_KEYS = {"name", "data", "synthetic", "synthetic_seed", "seeds", "baseline", "situation", "cell_reports"}
SYNTHETIC_SIZES = ("tiny", "small", "full")
_CHOICES: dict[str, tuple[str, ...]] = {
    "partition": SCHEMES, "strategy": tuple(sorted(STRATEGIES)), "bank": BANK_MODES, "precision": PRECISIONS,
    "poison": ("", *ATTACKS),
}


class StudyConfigError(FedinspectError, ValueError):
    """A study file that cannot be run; the message starts with the file (and the cell) at fault."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "settings"}


def option_names() -> list[str]:
    """Every option a study may set (FederationConfig and RoundSettings fields, without ``seed``)."""
    return sorted((set(_fields(FederationConfig)) | set(_fields(RoundSettings))) - {"seed"})


def _default(name: str) -> Any:
    for cls in (FederationConfig, RoundSettings):
        item = _fields(cls).get(name)
        if item is not None:
            if item.default is not dataclasses.MISSING:
                return item.default
            return item.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def _check_value(name: str, value: Any) -> Any:
    """``value`` converted to the option's type; ValueError with the expected type otherwise."""
    default = _default(name)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"option {name!r} must be one of {list(_CHOICES[name])}, got {value!r}")
    if name == "layers":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"option 'layers' must be a list of layer names, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"option {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float) or (default is None and name == "global_ratio"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"option {name!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"option {name!r} must be a string, got {value!r}")
        return value
    return value


def build_config(options: Mapping[str, Any], seed: int) -> FederationConfig:
    """The FederationConfig of one cell; ValueError naming the option for an unknown name or a bad value."""
    known = option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options: {', '.join(known)}")
    values = {name: _check_value(name, value) for name, value in options.items()}
    settings_fields = set(_fields(RoundSettings))
    settings = RoundSettings(**{k: v for k, v in values.items() if k in settings_fields}, seed=seed)
    config = FederationConfig(**{k: v for k, v in values.items() if k not in settings_fields}, settings=settings)
    config.server()  # the server checks the strategy, bank mode and sizes
    if config.clients < 1 or config.min_clients > config.clients:
        raise ValueError(f"need 1 <= min_clients <= clients, got clients={config.clients}, "
                         f"min_clients={config.min_clients}")
    return config


@dataclass(frozen=True)
class Cell:
    """One federated run of the study: its id (its folder under OUT/cells/), grid levels, seed and config."""

    cell_id: str
    levels: dict[str, str]  # axis -> level label
    seed: int
    options: dict[str, Any]  # the options that differ from the defaults (study options and levels)
    config: FederationConfig

    @property
    def group(self) -> tuple[str, ...]:
        """The grid point without the seed (cells of one group differ only by seed)."""
        return tuple(self.levels.values())


@dataclass
class StudyConfig:
    """A parsed study file."""

    path: Path
    name: str
    seeds: list[int]
    baseline: str
    situation: str | None
    options: dict[str, Any]
    axes: dict[str, list[tuple[str, dict[str, Any]]]]  # axis -> [(label, options)]
    data: Path | None = None
    synthetic: str | None = None
    synthetic_seed: int = 0
    cell_reports: bool = False
    cells: list[Cell] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _levels(path: Path, axis: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(values, list) or not values:
        raise StudyConfigError(path, f"[grid] {axis} must be a non-empty list of levels, got {values!r}")
    levels = []
    for value in values:
        if isinstance(value, dict):
            options = {k: v for k, v in value.items() if k != "name"}
            if not options:
                raise StudyConfigError(path, f"[grid] {axis}: a level table sets no option: {value!r}")
            label = str(value.get("name") or "-".join(_label(v) for v in options.values()))
        else:
            options, label = {axis: value}, _label(value)
        levels.append((_slug(label), options))
    labels = [label for label, _ in levels]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise StudyConfigError(path, f"[grid] {axis}: several levels are labelled {duplicates}; give them a name")
    return levels


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file; every cell's configuration is built here (StudyConfigError if any fails)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyConfigError(path, "study file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise StudyConfigError(path, f"not valid TOML: {error}") from error
    unknown = sorted(set(raw) - {"study", "options", "grid"})
    if unknown:
        raise StudyConfigError(path, f"unknown table(s) {unknown}; a study has [study], [options] and [grid]")
    study, options, grid = raw.get("study", {}), raw.get("options", {}), raw.get("grid", {})
    if not isinstance(study, dict) or not isinstance(options, dict) or not isinstance(grid, dict):
        raise StudyConfigError(path, "[study], [options] and [grid] must be tables")
    unknown = sorted(set(study) - STUDY_KEYS)
    if unknown:
        raise StudyConfigError(path, f"unknown key(s) {unknown} in [study]; valid keys: {sorted(STUDY_KEYS)}")

    seeds = study.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                            for s in seeds) or len(set(seeds)) != len(seeds)):
        raise StudyConfigError(path, f"[study] seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    if "seed" in options or "seed" in grid:
        raise StudyConfigError(path, "'seed' is not an option: list the seeds in [study] seeds")
    data, synthetic = study.get("data"), study.get("synthetic")
    if (data is None) == (synthetic is None):
        raise StudyConfigError(path, "[study] needs exactly one of 'data' (a dataset folder) or 'synthetic' "
                                     f"(one of {list(SYNTHETIC_SIZES)})")
    if synthetic is not None and synthetic not in SYNTHETIC_SIZES:
        raise StudyConfigError(path, f"[study] synthetic must be one of {list(SYNTHETIC_SIZES)}, got {synthetic!r}")
    baseline = study.get("baseline", "federated_coreset")
    if baseline not in STRATEGIES:
        raise StudyConfigError(path, f"[study] baseline {baseline!r} is not a strategy; "
                                     f"available: {sorted(STRATEGIES)}")
    axes = {str(axis): _levels(path, str(axis), values) for axis, values in grid.items()}
    situation = study.get("situation", "partition" if "partition" in axes else None)
    if situation is not None and situation not in axes:
        raise StudyConfigError(path, f"[study] situation {situation!r} is not a grid axis; axes: {list(axes)}")
    synthetic_seed = study.get("synthetic_seed", 0)
    if not isinstance(synthetic_seed, int) or isinstance(synthetic_seed, bool) or synthetic_seed < 0:
        raise StudyConfigError(path, f"[study] synthetic_seed must be an integer >= 0, got {synthetic_seed!r}")

    cell_reports = study.get("cell_reports", False)
    if not isinstance(cell_reports, bool):
        raise StudyConfigError(path, f"[study] cell_reports must be true or false, got {cell_reports!r}")
    config = StudyConfig(
        path=path, name=str(study.get("name", path.stem)), seeds=list(seeds), baseline=baseline, situation=situation,
        options=dict(options), axes=axes, synthetic=synthetic, synthetic_seed=synthetic_seed, cell_reports=cell_reports,
        data=None if data is None else (path.parent / str(data)).resolve(),
    )
    config.cells = _cells(config)
    return config


def _cells(config: StudyConfig) -> list[Cell]:
    cells = []
    axis_names = list(config.axes)
    for combination in itertools.product(*config.axes.values()):
        levels = {axis: label for axis, (label, _) in zip(axis_names, combination, strict=True)}
        options = dict(config.options)
        for _, level_options in combination:
            options.update(level_options)
        for seed in config.seeds:
            cell_id = "__".join([*levels.values(), f"seed{seed}"])
            try:
                federation = build_config(options, seed)
            except (ValueError, TypeError) as error:
                raise StudyConfigError(config.path, f"cell {cell_id}: {error}") from None
            cells.append(Cell(cell_id, levels, seed, options, federation))
    return cells
