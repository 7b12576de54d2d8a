"""The one exception type that reaches the user as a sentence instead of a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad arguments, missing data, a corrupt run.

    Entry points catch it, print ``str(err)`` as one sentence and exit with ``exit_code``
    (2 for usage errors, as argparse does; 1 for everything else).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
