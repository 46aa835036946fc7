"""quiet_warnings.ignoring: a silenced block in one thread never undoes or leaks into another's."""

from __future__ import annotations

import threading
import warnings

import pytest

from fedinspect.quiet_warnings import ignoring


class FirstWarning(UserWarning):
    pass


class SecondWarning(UserWarning):
    pass


def test_ignoring_silences_only_the_named_category_and_message() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ignoring(FirstWarning, message="expected"):
            warnings.warn("expected notice", FirstWarning, stacklevel=1)
            warnings.warn("another text", FirstWarning, stacklevel=1)
            warnings.warn("expected notice", SecondWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FirstWarning, "another text"), (SecondWarning, "expected notice")]


def test_ignoring_needs_a_category() -> None:
    with pytest.raises(ValueError, match="categories"), ignoring():
        pass


def test_two_threads_do_not_interleave_their_filter_lists() -> None:
    # With bare catch_warnings, the second thread enters while the first is inside, and the exits in that order
    # restore the second's saved list, which holds the first's "ignore": a filter leaked for good.
    before = list(warnings.filters)
    first_inside, release_first = threading.Event(), threading.Event()
    second_inside, release_second = threading.Event(), threading.Event()

    def first() -> None:
        with ignoring(FirstWarning):
            first_inside.set()
            release_first.wait(30)

    def second() -> None:
        with ignoring(SecondWarning):
            second_inside.set()
            release_second.wait(30)

    one = threading.Thread(target=first)
    one.start()
    assert first_inside.wait(30)
    two = threading.Thread(target=second)
    two.start()
    entered_while_first_inside = second_inside.wait(0.5)
    release_first.set()
    one.join(30)
    assert second_inside.wait(30)
    release_second.set()
    two.join(30)
    assert not one.is_alive() and not two.is_alive()
    assert not entered_while_first_inside
    assert warnings.filters == before
