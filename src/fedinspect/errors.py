"""Exceptions that name the file or component at fault, so a user can fix their data."""

from __future__ import annotations

from pathlib import Path


class FedinspectError(Exception):
    """Base class of every error fedinspect raises on purpose."""


class DataError(FedinspectError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    The message always starts with the path concerned.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsNotFoundError(FedinspectError, FileNotFoundError):
    """Pretrained weights for a backbone could not be found locally."""


class ModelFileError(FedinspectError, ValueError):
    """A saved model is missing, corrupt or was written by an incompatible version."""


class SettingsError(FedinspectError, ValueError):
    """A setting from the command line, a configuration or a model file is out of range."""
