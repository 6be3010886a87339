"""What the cluster CLIs (status, cancel) share: a clean exit when the reader of stdout goes away."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


def main_quietly(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``, but ``| head`` closing the pipe early ends it quietly instead of a traceback.

    The work (a cancel, a status query) is done by then; only output nobody reads is lost. As
    Python's documentation advises, stdout is pointed at /dev/null so the interpreter's final
    flush does not raise again.
    """
    try:
        rc = main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
