"""What every stage's ``main()`` shares: logging set-up and turning errors into exit codes."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn

from classifier.errors import StageError
from classifier.quiet import log_tensorflow_through_root
from classifier.workspace import exclusive_stage

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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Signals received by this process. Python runs a handler between any two bytecodes, so
# its exception can land in a garbage-collector callback or a ``__del__``, where Python
# prints "Exception ignored" and carries on; long loops call raise_if_signalled() so that
# such a swallowed signal still stops them at their next safe point.
_received: list[int] = []
INTERRUPTS = (signal.SIGTERM, signal.SIGINT)


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    raise _interruption(signum)


def raise_if_signalled() -> None:
    """Raise Terminated (SIGTERM) or KeyboardInterrupt (Ctrl-C) if one arrived and was lost."""
    if _received:
        raise _interruption(_received[0])


def pause_collector_while_starting() -> None:
    """Pause the cycle collector if this process is ``python -m stages.<stage>``.

    The ``stages`` package calls this; Python imports it before the stage module it runs,
    and sets ``sys.argv[0]`` to ``"-m"`` while it looks that module up. Importing
    TensorFlow, Keras and MLflow makes millions of objects that live as long as the process,
    and the collector would walk them again and again while they load. run_stage() freezes
    them and resumes it. Measured on 2 cores with ``/usr/bin/time``, interleaved runs:
    ``python -m stages.evaluate`` took 15.8 and 17.6 s without, 14.0 and 15.5 s with.
    A program that only imports the package (a test, a notebook) is left as it is.
    """
    if sys.argv[:1] == ["-m"]:
        gc.disable()


def _resume_collector() -> None:
    """Start-up is over: freeze what it made out of the collector's walks, then resume it.

    Importing the evaluate stage leaves about 4,300 unreachable objects among 427,000; they
    stay frozen, since a collection to free them first costs 0.65 CPU-seconds."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def run_stage(name: str, body: Callable[[], object], params: Path | None = None) -> int:
    """Run a stage's body; expected failures become one line on stderr and exit code 1.

    Ctrl-C and SIGTERM (what `kill`, DVC and schedulers send) exit with 130 and 143, the
    shell's codes for those signals. The signal handlers are the stage's only while it runs.
    A pipeline stage passes its ``params`` file: under DVC it then holds the workspace while
    it runs (classifier/workspace.py).
    """
    _resume_collector()
    level = os.environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        print(
            f"{name}: error: LOG_LEVEL: unknown level {level!r}, expected one of "
            f"{', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        return 1
    previous = {signum: signal.signal(signum, _on_signal) for signum in INTERRUPTS}
    _received.clear()
    logging.basicConfig(level=level, format=f"%(asctime)s {name}: %(message)s", datefmt="%H:%M:%S")
    log_tensorflow_through_root()
    try:
        with exclusive_stage(name, params) if params is not None else nullcontext():
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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
    return 0


def exit_process(code: int) -> NoReturn:
    """End this process with exit ``code``: the last call of a stage's or tool's ``__main__``.

    At exit, Python's cycle collector walks every object once more: after TensorFlow, Keras
    and MLflow are imported, millions of them. By then the stage has written and closed its
    outputs and ended its MLflow run, so ``gc.freeze()`` takes those objects out of the
    collector's sight; exit handlers and the freeing of modules run as usual. Measured on 2
    cores, three runs each: ``python -m stages.evaluate`` used 20.6 CPU-seconds without it
    and 17.6 with it. Never call this from code that goes on running (a test that calls
    ``main()``, say): what it freezes is never collected.
    """
    gc.freeze()
    raise SystemExit(code)
