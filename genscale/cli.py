"""What every entry point shares: the repo on sys.path and errors as one sentence."""
from __future__ import annotations

import sys
from typing import Callable

from genscale.errors import UserError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call ``main`` and turn a UserError into one line on stderr and its exit code."""
    try:
        code = main(argv)
    except UserError as err:
        if str(err):
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
