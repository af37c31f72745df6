"""The one exception type for user mistakes, and the one place it is reported.

Anything raised as ``UserError`` is printed by the entry point as one line per problem
(``error: ...``) with exit code 2 and no traceback: one line, or one per line of its message when
``Problems`` gathered several. Use it for bad input (config values, paths, files); let real bugs
raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable)
T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input: one line per problem, exit code 2."""


class Problems:
    """The problems of independent checks, gathered so that one start reports all of them.

    ``add`` keeps one line; ``check(fn, ...)`` calls ``fn``, keeps a ``UserError`` it raises as one
    line and returns None instead of ``fn``'s value (a check that needs that value is then skipped).
    ``raise_all`` raises one ``UserError`` whose message has one line per problem, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def check(self, fn: Callable[..., T], *args, **kwargs) -> T | None:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            self.lines.append(str(err))
            return None

    def raise_all(self) -> None:
        if self.lines:
            raise UserError("\n".join(self.lines))


def check_exact_keys(group: Mapping, keys: Sequence[str], what: str) -> None:
    """A config group must have exactly ``keys``: else one ``UserError`` line naming ``what``, the
    unknown and the missing keys (both sorted) and the expected ones (in ``keys``' order)."""
    unknown = sorted(set(group) - set(keys))
    missing = sorted(set(keys) - set(group))
    if unknown or missing:
        raise UserError(f"{what}: unknown keys {unknown} / missing keys {missing}; expected {list(keys)}")


def exit_user_error(err: UserError) -> NoReturn:
    """Print ``error: <line>`` on stderr for each line of ``err`` (one per problem), exit with code 2."""
    for line in str(err).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def entry_point(main: F) -> F:
    """Wrap a console entry function: a ``UserError`` raised anywhere inside it ends the process
    through ``exit_user_error``; other exceptions propagate unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            exit_user_error(err)

    return wrapper  # type: ignore[return-value]
