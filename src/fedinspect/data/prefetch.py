"""Run an iterator ahead in a background thread, so that reading and resizing images overlaps the backbone.

PNG decoding (Pillow) and torch's resizing release the GIL, so one producer thread keeps the next batch
ready while the backbone (OpenVINO, onnxruntime or torch, all outside the GIL) computes the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items``, in order, computed up to ``depth`` ahead in one background thread.

    An exception raised while producing an item is raised here, where that item would have come, with its
    own type and traceback. Closing the iterator early (a ``break``, an error in the consumer) stops the
    producer after the item it is working on.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as error:  # handed to the consumer, never lost
            put((False, error))

    worker = threading.Thread(target=produce, name="fedinspect-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item  # type: ignore[misc]
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
