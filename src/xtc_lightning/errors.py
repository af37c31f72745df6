"""The one exception type for user mistakes.

Anything raised as ``UserError`` is printed by the entry point as a single line
(``error: ...``) with exit code 2 and no traceback. Use it for bad input
(config values, paths, files); let real bugs raise normally.
"""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""
