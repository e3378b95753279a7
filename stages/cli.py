"""What every stage's ``main()`` shares: logging set-up and turning errors into exit codes."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from stages.errors import StageError


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C (MLflow runs end KILLED, temporaries go)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def run_stage(name: str, body: Callable[[], object]) -> int:
    """Run a stage's body; expected failures become one line on stderr and exit code 1.

    Ctrl-C and SIGTERM (what `kill`, DVC and schedulers send) exit with 130 and 143, the
    shell's codes for those signals.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name}: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        body()
    except (StageError, OSError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0
