"""The background prefetch keeps order, hands errors over and stops when the consumer does."""

from __future__ import annotations

import threading

import pytest

from fedinspect.data.prefetch import prefetch
from fedinspect.errors import DataError


def test_items_come_in_order_and_all_of_them() -> None:
    assert list(prefetch(range(100), depth=3)) == list(range(100))
    assert list(prefetch([])) == []


def test_an_error_of_the_producer_is_raised_where_its_item_would_come() -> None:
    def images():
        yield 1
        yield 2
        raise DataError("a.png", "cannot read image")

    got = []
    with pytest.raises(DataError, match=r"a\.png: cannot read image"):
        for item in prefetch(images()):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_producer() -> None:
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    before = threading.active_count()
    for item in prefetch(endless(), depth=2):
        if item == 5:
            break  # closing the generator joins the producer
    assert threading.active_count() == before
    assert len(produced) <= 6 + 2 + 1  # the consumed, the queue's and the one in hand


def test_the_next_item_is_produced_while_the_consumer_works() -> None:
    started = [threading.Event() for _ in range(3)]

    def items():
        for n in range(3):
            started[n].set()
            yield n

    for item in prefetch(items(), depth=1):
        if item < 2:  # while the consumer holds item n, the producer reaches item n + 1 (waits, does not race)
            assert started[item + 1].wait(timeout=60)


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth must be >= 1"):
        list(prefetch([1], depth=0))
