"""What every stage's ``main()`` shares: logging set-up and turning errors into exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from stages.errors import StageError

log = logging.getLogger("stages")


def run_stage(name: str, body: Callable[[], object]) -> int:
    """Run a stage's body; expected failures become one line on stderr and exit code 1."""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name}: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        body()
    except StageError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0
