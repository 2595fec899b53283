"""The one exception type for mistakes a user can fix.

Anything raised as :class:`UserError` is printed by the CLI as a single line
(``danlu: error: ...``) with exit code 2 and no traceback. Everything else is a
bug in danlu or a library and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, data, paths or flags; the message says how to fix it."""

    exit_code = 2
