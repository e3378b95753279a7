"""One pipeline run at a time in a workspace: the guard every stage takes under DVC."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from classifier import workspace
from classifier.workspace import ConcurrentRun, exclusive_stage


@pytest.fixture
def dvc_workspace(tmp_path, monkeypatch):
    """A workspace as DVC runs a stage in it: DVC_ROOT set, a params file."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n")
    return params


@pytest.fixture
def another_pipeline():
    """A live process standing for another `dvc exp run`."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()


def test_outside_dvc_nothing_is_checked_or_written(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with exclusive_stage("train", tmp_path / "params.yaml"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stages_of_one_pipeline_run_one_after_another(dvc_workspace):
    for stage in ("preprocess", "train", "evaluate"):
        with exclusive_stage(stage, dvc_workspace):
            pass


def test_a_stage_of_another_live_run_stops_at_once_pointing_to_the_queue(
    dvc_workspace, another_pipeline, monkeypatch
):
    monkeypatch.setattr(workspace, "pipeline_pid", lambda: another_pipeline)
    monkeypatch.setenv("DVC_EXP_NAME", "first")
    with exclusive_stage("train", dvc_workspace):
        pass
    monkeypatch.undo()
    monkeypatch.setenv("DVC_ROOT", str(dvc_workspace.parent))
    with (
        pytest.raises(ConcurrentRun, match=r"stage train of experiment 'first' .* ran last"),
        exclusive_stage("train", dvc_workspace),
    ):
        pytest.fail("the second run's stage ran")


def test_a_stage_while_another_holds_the_workspace_stops_at_once(dvc_workspace):
    with (
        exclusive_stage("train", dvc_workspace),
        pytest.raises(ConcurrentRun, match=r"stage train .* is running; .*--queue"),
        exclusive_stage("evaluate", dvc_workspace),
    ):
        pytest.fail("two stages ran at once")


def test_params_changed_under_a_run_stop_its_next_stage(dvc_workspace):
    with exclusive_stage("train", dvc_workspace):
        pass
    dvc_workspace.write_text("train:\n  epochs: 1\n")  # another `dvc exp run -S` wrote it
    with (
        pytest.raises(ConcurrentRun, match=r"params.yaml changed while this pipeline ran"),
        exclusive_stage("evaluate", dvc_workspace),
    ):
        pytest.fail("the stage ran with other params than the run's earlier stages")


def test_a_run_whose_process_is_gone_does_not_hold_the_workspace(dvc_workspace, monkeypatch):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout  # fmt: skip
    monkeypatch.setattr(workspace, "pipeline_pid", lambda: int(finished))
    with exclusive_stage("export", dvc_workspace):
        pass
    monkeypatch.undo()
    monkeypatch.setenv("DVC_ROOT", str(dvc_workspace.parent))
    with exclusive_stage("train", dvc_workspace):  # a new run, later
        pass


def test_queued_experiments_each_hold_their_own_copy_not_the_project(tmp_path, monkeypatch):
    """DVC sets DVC_ROOT to the project for a queued experiment, which runs in a copy."""
    project = tmp_path / "project"
    copies = [project / ".dvc" / "tmp" / "exps" / name for name in ("tmpa1", "tmpb2")]
    for copy in copies:
        copy.mkdir(parents=True)
        (copy / "params.yaml").write_text("train:\n  epochs: 3\n")
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.chdir(copies[0])
    with exclusive_stage("train", copies[0] / "params.yaml"):
        monkeypatch.chdir(copies[1])
        with exclusive_stage("train", copies[1] / "params.yaml"):
            pass
    assert workspace.workspace_root() == copies[1]
    assert (copies[0] / workspace.LOCK_FILE).exists()
    assert not (project / workspace.LOCK_FILE).exists()


@pytest.fixture
def exp_run_with(request):
    """A live process whose command line is a `dvc exp run` with the given arguments."""
    argv = [sys.executable, "-c", "import time; time.sleep(300)", "exp", "run", *request.param]
    process = subprocess.Popen(argv)
    deadline = time.monotonic() + 30
    while "exp" not in workspace._command_line(process.pid):  # until its exec is visible
        assert time.monotonic() < deadline, "the stand-in process never started"
        time.sleep(0.01)
    yield process.pid
    process.kill()
    process.wait()


@pytest.mark.parametrize(
    "exp_run_with",
    [["-S", "train.epochs=5"], ["--set-param=train.epochs=5"], ["-Strain.epochs=5"]],
    indirect=True,
)
def test_a_first_stage_stops_when_params_lost_its_runs_set_values(
    dvc_workspace, exp_run_with, monkeypatch
):
    # The run was started with -S train.epochs=5; another `dvc exp run` wrote epochs: 3
    # before this run's first stage ran (its earlier stages were skipped as unchanged).
    monkeypatch.setattr(workspace, "pipeline_pid", lambda: exp_run_with)
    with (
        pytest.raises(
            ConcurrentRun,
            match=r"params.yaml changed since this `dvc exp run` started: "
            r"train.epochs is 3, not 5\. Another `dvc exp run`",
        ),
        exclusive_stage("train", dvc_workspace),
    ):
        pytest.fail("the stage trained with another run's params")


@pytest.mark.parametrize(
    "exp_run_with",
    [["-S", "train.epochs=3", "-S", "+train.new=1", "-n", "x"], ["--queue"]],
    indirect=True,
)
def test_a_run_whose_set_values_hold_goes_on(dvc_workspace, exp_run_with, monkeypatch):
    monkeypatch.setattr(workspace, "pipeline_pid", lambda: exp_run_with)
    assert workspace.set_params_of(exp_run_with) == (
        {"train.epochs": "3"} if "-S" in workspace._command_line(exp_run_with) else {}
    )
    with exclusive_stage("train", dvc_workspace):
        pass
