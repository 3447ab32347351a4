"""The one exception type for mistakes a user can fix.

Library code raises `UserError` (or a subclass) for bad input: a missing file,
a malformed line, an unknown config key. Command-line entry points catch it and
print its message on one line, without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input that the user can fix; the message names the file, line, key or value."""


class ConfigError(UserError, ValueError):
    """A config field has an unknown name, a wrong type or an invalid value."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main()` and exit with its code; a `UserError` becomes `error: ...` on stderr and exit code 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
