"""Running a command-line entry point so that a user's mistake ends in one message.

`run(main)` is `absl.app.run(main)`, except that a `ValueError` or `OSError` escaping `main`
(the project's errors for bad files, folders, configs and flags are all one of these), or the
trainer's `NonFiniteLossError` (a `FloatingPointError` naming the step and the batch), ends the
program with `python -m <module>: error: <message>` on stderr and exit status 1 instead of a
Python traceback. Set MEDJAX_TRACEBACK=1 to get the traceback as well (for a bug report).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, logging

TRACEBACK_VARIABLE = "MEDJAX_TRACEBACK"


def run(main: Callable[[list[str]], object]) -> None:
    """Runs an absl `main(argv)`; user errors become one line on stderr and exit status 1.

    Args:
      main: the program's main function, as given to `absl.app.run`.
    """

    def guarded(argv: list[str]):
        try:
            return main(argv)
        except (ValueError, OSError, FloatingPointError) as e:
            if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
                raise
            logging.debug("Stopped by a user error.", exc_info=True)
            sys.exit(f"{_program()}: error: {e}\n(set {TRACEBACK_VARIABLE}=1 for the traceback)")

    app.run(guarded)


def _program() -> str:
    """'python -m medjax.main' for `python -m medjax.main`, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}"
    return os.path.basename(sys.argv[0]) if sys.argv else "medjax"
