"""The one exception type for user mistakes, and the one place it is reported.

Anything raised as ``UserError`` is printed by the entry point as a single line
(``error: ...``) with exit code 2 and no traceback. Use it for bad input
(config values, paths, files); let real bugs raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


def check_exact_keys(group: Mapping, keys: Sequence[str], what: str) -> None:
    """A config group must have exactly ``keys``: else one ``UserError`` line naming ``what``, the
    unknown and the missing keys (both sorted) and the expected ones (in ``keys``' order)."""
    unknown = sorted(set(group) - set(keys))
    missing = sorted(set(keys) - set(group))
    if unknown or missing:
        raise UserError(f"{what}: unknown keys {unknown} / missing keys {missing}; expected {list(keys)}")


def exit_user_error(err: UserError) -> NoReturn:
    """Print ``error: <err>`` as one line on stderr and exit with code 2."""
    print(f"error: {err}", file=sys.stderr)
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
