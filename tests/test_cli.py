import contextlib
import os
import signal
from pathlib import Path

import pytest

from classifier.cli import raise_if_signalled, run_stage
from classifier.errors import DataError


def test_expected_error_is_one_line_and_exit_1(capsys):
    def body():
        raise DataError("data/raw/images.npy: missing")

    assert run_stage("train", body) == 1
    assert capsys.readouterr().err == "train: error: data/raw/images.npy: missing\n"


def test_unexpected_error_keeps_its_traceback():
    def body():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage("train", body)


def test_sigterm_unwinds_the_stage_and_exits_143(capsys):
    unwound = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the stage")
        finally:
            unwound.append(True)

    assert run_stage("train", body) == 143
    assert unwound == [True]
    assert capsys.readouterr().err == "train: terminated\n"


def test_ctrl_c_exits_130(capsys):
    def body():
        raise KeyboardInterrupt

    assert run_stage("export", body) == 130
    assert capsys.readouterr().err == "export: interrupted\n"


def test_a_sigterm_whose_exception_was_swallowed_is_raised_at_the_next_check(capsys):
    def body():
        # what Python does to an exception raised in a weakref callback or __del__
        with contextlib.suppress(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        raise_if_signalled()
        raise AssertionError("the lost SIGTERM was not raised again")

    assert run_stage("train", body) == 143
    assert capsys.readouterr().err == "train: terminated\n"


def test_the_stage_signal_handlers_are_put_back_and_forget_the_signal():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def body():
        os.kill(os.getpid(), signal.SIGINT)

    assert run_stage("train", body) == 130
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    raise_if_signalled()  # the stage's Ctrl-C does not leak into whatever runs next


def test_a_process_ended_by_exit_process_keeps_its_code_and_exit_handlers_with_gc_frozen(
    tmp_path,
):
    """What the stages' processes end with: their exit code, their exit handlers run (MLflow
    and logging flush there), and the collector's last walk spared (objects frozen)."""
    import subprocess
    import sys

    script = (
        "import atexit, gc, sys\n"
        "from classifier.cli import exit_process\n"
        "atexit.register(lambda: print('exit handlers ran; frozen', gc.get_freeze_count() > 0))\n"
        "sys.stdout.write('buffered, not flushed yet ')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, not flushed yet exit handlers ran; frozen True\n"
