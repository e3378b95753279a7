"""What every stage's ``main()`` shares: logging set-up and turning errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from stages.errors import StageError

# Paths that several stages read, with the defaults dvc.yaml passes: (default, help).
PREPARED = ("data/prepared", "prepared train/val/test splits")
MODEL = ("models/model.keras", "trained Keras model")
RUN_INFO = ("lineage/train_run.json", "the training run's MLflow id")


def stage_parser(stage: str, description: str, **paths: tuple[str, str]) -> argparse.ArgumentParser:
    """The command line of ``python -m stages.<stage>``: ``--params`` and one option per path.

    ``paths`` maps each option (``run_info`` becomes ``--run-info``) to (default, help).
    Numbers never come from the command line, only from params.yaml.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=description,
        epilog="Every number comes from params.yaml; the default paths are dvc.yaml's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    for name, (default, help_text) in paths.items():
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=Path, default=Path(default), help=help_text)
    return parser


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
