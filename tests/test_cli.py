import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from classifier.cli import raise_if_signalled, run_stage
from classifier.errors import DataError
from tests.helpers import PROJECT_ROOT


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
    script = (
        "import atexit, gc, sys\n"
        "from classifier.cli import exit_process\n"
        "atexit.register(lambda: print('exit handlers ran; frozen', gc.get_freeze_count() > 0))\n"
        "sys.stdout.write('buffered, not flushed yet ')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, not flushed yet exit handlers ran; frozen True\n"


def run_python(*args: str, cwd: Path = PROJECT_ROOT) -> str:
    """stdout of a fresh interpreter run with ``args`` in ``cwd``; fails on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_python_dash_m_names_itself_in_argv_while_it_imports_the_modules_package(tmp_path):
    """What pause_collector_while_starting() relies on, on this interpreter."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("import sys\nSEEN = list(sys.argv)\n")
    (tmp_path / "probe" / "main.py").write_text("from probe import SEEN\nprint(SEEN)\n")
    assert run_python("-m", "probe.main", "x", cwd=tmp_path) == "['-m', 'x']\n"
    assert run_python("-c", "import probe; print(probe.SEEN)", cwd=tmp_path) == "['-c']\n"


def test_a_stage_started_with_dash_m_imports_with_the_collector_paused_and_runs_with_it_on():
    """Paused while the library loads; run_stage() freezes what loading made and resumes the
    collector, so the stage's own work is collected as usual."""
    script = (
        "import gc, sys\n"
        "sys.argv[0] = '-m'\n"  # as `python -m` sets it while it imports the package
        "import stages\n"
        "paused = not gc.isenabled()\n"
        "from classifier.cli import run_stage\n"
        "during = []\n"
        "run_stage('probe', lambda: during.append((gc.isenabled(), gc.get_freeze_count() > 0)))\n"
        "print(paused, during)\n"
    )
    assert run_python("-c", script) == "True [(True, True)]\n"


def test_importing_the_stages_elsewhere_leaves_the_collector_alone():
    script = (
        "import gc\n"
        "import stages\n"
        "from classifier.cli import run_stage\n"
        "run_stage('probe', lambda: None)\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    assert run_python("-c", script) == "True 0\n"
