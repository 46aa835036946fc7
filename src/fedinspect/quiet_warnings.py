"""Silence an expected warning inside one block, safely when several threads do it.

Python before 3.14 keeps one warning-filter list per process: ``warnings.catch_warnings`` saves it on entry
and puts the saved copy back on exit. Two threads doing so at once restore each other's lists, so one
block's "ignore" is undone in the middle of another (seen: the tracer's warnings of every ONNX export
printed while the read-ahead thread opened images) or outlives its block for the rest of the process.
Every block of fedinspect that silences a warning goes through :func:`ignoring`, which holds one lock: a
block must therefore not wait on another thread that silences warnings (DP-SGD's training holds it throughout,
and reads no images in other threads).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_FILTERS_LOCK = threading.RLock()


@contextmanager
def ignoring(*categories: type[Warning], message: str = "") -> Iterator[None]:
    """Ignore warnings of ``categories`` (whose text starts with the regex ``message``) inside the block."""
    if not categories:
        raise ValueError("name the warning categories to ignore")
    with _FILTERS_LOCK, warnings.catch_warnings():
        for category in categories:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
