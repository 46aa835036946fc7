"""Output folders written all at once: a failed or concurrent run never leaves a mix of old and new files.

:func:`staged_output` locks the target folder (``.<name>.lock`` beside it, non-blocking: a second
writer fails at once with :class:`FolderBusyError`), hands out a staging folder beside the target
(same filesystem) and, only when the block finishes without an error, moves the staging folder into
place. An existing run in the target is replaced at that moment, never before; a failure removes
the staging folder and leaves the target exactly as it was.

Replacing deletes the old folder, so only folders fedinspect writes are replaced: a target that holds
files but none of :data:`RUN_FILES` is refused (``--out ~/Documents`` never deletes anything).
Lock files stay beside their folders (removing one would let two writers hold different locks).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedinspect.detectors.registry import SETTINGS_FILES
from fedinspect.errors import FedinspectError

# Files that mark a folder as a fedinspect output (a model, a run, an evaluation, a study cell).
RUN_FILES = ("results.json", "memory_bank.safetensors", "gaussians.safetensors", "weights.safetensors",
             "partition.json", "experiment.json", "error.txt", "fit.json", "zoo_study.json",
             *SETTINGS_FILES)  # every detector's settings file: patchcore.json, padim.json, ae_mse.json, ...
STAGING_INFIX = ".partial-"
REPLACED_INFIX = ".replaced-"


class FolderBusyError(FedinspectError):
    """Another process is writing the same output folder."""


def lock_path(target: str | Path) -> Path:
    """The lock file of output folder ``target`` (beside it, hidden)."""
    target = Path(target).resolve()
    return target.parent / f".{target.name}.lock"


def _is_replaceable(target: Path) -> bool:
    if not target.exists():
        return True
    if not target.is_dir():
        return False
    names = {path.name for path in target.iterdir()}
    return not names or bool(names.intersection(RUN_FILES))


def _remove_leftovers(target: Path) -> None:
    """Staging and replaced folders of ``target`` left by a process that was killed (we hold the lock)."""
    for infix in (STAGING_INFIX, REPLACED_INFIX):
        for path in target.parent.glob(f".{target.name}{infix}*"):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(target: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``target`` (replacing a previous run there).

    ``inputs`` (the run's data, its model) may not lie inside ``target``: replacing it would delete them.

    Raises:
        FolderBusyError: another process holds ``target``'s lock.
        FedinspectError: ``target`` is a file, a folder of other files, or holds one of ``inputs``.
    """
    target = Path(target).resolve()
    for source in inputs:
        if target in (Path(source).resolve(), *Path(source).resolve().parents):
            raise FedinspectError(f"{target}: holds {source}, which this run reads and would replace: "
                                  "choose another output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(target), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise FolderBusyError(f"{target}: another fedinspect process is writing this folder "
                                  f"(lock {lock_path(target)}); wait for it or choose another --out") from error
        try:
            if not _is_replaceable(target):
                raise FedinspectError(f"{target}: exists and is not a fedinspect output folder (none of "
                                      f"{', '.join(RUN_FILES)} in it); it would be replaced: choose another --out")
            _remove_leftovers(target)
            staging = _sibling(target, STAGING_INFIX)
            staging.mkdir()  # the umask's mode, as the folder it becomes would have had
            try:
                yield staging
                _replace(target, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(target: Path, staging: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    replaced = _sibling(target, REPLACED_INFIX)
    os.rename(target, replaced)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(replaced, target)  # put the old run back
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def _sibling(target: Path, infix: str) -> Path:
    """A fresh hidden name beside ``target`` (same filesystem, so renames are atomic)."""
    return target.parent / f".{target.name}{infix}{os.getpid()}-{secrets.token_hex(4)}"
