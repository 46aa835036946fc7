"""How every ``fedinspect`` command spells its options: one convention, written once.

- A list is one argument, its items separated by commas: ``--epsilons 1,5,none``, ``--models cnn,mobile``.
- Obfuscation methods applied together are joined by ``+``: ``--obfuscate average+shuffle``, and a list of
  such combinations is a comma list: ``--obfuscations none,average+shuffle``.
- The same idea has the same name in every command (``--dp-delta``, ``--dp-clip``, ``--dp-noise``, ...).
- Every option's help ends with its default.

Spellings of the previous release (``--delta``, ``--max-grad-norm``, ``;``-separated or space-separated lists,
comma-joined obfuscation methods) still work for one release and print a deprecation warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

NONE = "none"


def deprecated(message: str) -> None:
    """Tell the user that a spelling will go away (on stderr, once per use)."""
    print(f"fedinspect: deprecated: {message}", file=sys.stderr)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Ends each option's help with its default, when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None or default is False
                or default == "" or default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


class RenamedOption(argparse.Action):
    """An option whose old spelling (``old_names``) still works, with a deprecation message."""

    def __init__(self, option_strings: Sequence[str], dest: str, old_names: Sequence[str] = (),
                 **kwargs: Any) -> None:
        self.old_names = tuple(old_names)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string in self.old_names:
            deprecated(f"{option_string} is now {self.option_strings[0]}")
        setattr(namespace, self.dest, values)


def add_renamed(group: Any, name: str, old_names: Sequence[str], **kwargs: Any) -> argparse.Action:
    """``group.add_argument(name, *old_names)`` where the old names are deprecated spellings (hidden in help)."""
    return group.add_argument(name, *old_names, action=RenamedOption, old_names=old_names, **kwargs)


def split_list(values: str | Sequence[str], option: str, item: Callable[[str], Any] = str) -> tuple[Any, ...]:
    """The items of a comma list. ``values`` may also be the space-separated words of the old spelling."""
    if not isinstance(values, str):
        if len(values) > 1:
            deprecated(f"{option} takes one comma-separated list: {option} {','.join(values)}")
        values = ",".join(values)
    items = [part.strip() for part in values.split(",") if part.strip()]
    try:
        return tuple(item(part) for part in items)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from error


def obfuscation(value: str, option: str = "--obfuscate") -> str:
    """One combination of obfuscation methods, ``average+shuffle`` (``none`` or ``""``: no obfuscation).

    Returns the comma-joined form that :class:`~fedinspect.privacy.obfuscation.Obfuscation` reads.
    """
    value = value.strip()
    if value in ("", NONE):
        return ""
    if "," in value:
        deprecated(f"{option} joins methods with '+': {option} {value.replace(',', '+')}")
        value = value.replace(",", "+")
    return ",".join(part.strip() for part in value.split("+") if part.strip())


def obfuscation_list(values: str | Sequence[str], option: str = "--obfuscations") -> tuple[str, ...]:
    """A comma list of obfuscation combinations: ``none,average+shuffle`` (returned in the comma-joined form).

    Old spellings: ``;`` between combinations (``none;average+shuffle``), or space-separated words with
    comma-joined methods (``none average,shuffle``).
    """
    if not isinstance(values, str):
        if len(values) > 1:
            new = ",".join(v.replace(",", "+") for v in values)
            deprecated(f"{option} takes one comma-separated list, methods joined by '+': {option} {new}")
            return tuple(obfuscation(v.replace(",", "+"), option) for v in values)
        values = values[0] if values else ""
    if ";" in values:
        deprecated(f"{option} separates combinations with ',': {option} {values.replace(';', ',')}")
        return tuple(obfuscation(v, option) for v in values.split(";"))
    return tuple(obfuscation(v, option) for v in values.split(","))
