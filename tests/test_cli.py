import os
import signal

import pytest

from stages.cli import run_stage
from stages.errors import DataError


@pytest.fixture(autouse=True)
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


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
