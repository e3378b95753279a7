"""The sweep's DVC calls: a DVC command that does not answer is stopped; a finished trial's
metric is read at its experiment's commit."""

from __future__ import annotations

import time

import pytest

from classifier.sweeps import queue
from tests.helpers import one_stage_project, run_ok


def test_a_dvc_command_that_does_not_answer_in_time_is_stopped_with_one_error(tmp_path):
    # A real `dvc` process: its interpreter alone takes longer than a millisecond to start.
    started = time.monotonic()
    with pytest.raises(queue.QueueError, match=r"^dvc version: no answer within 0\.001 s"):
        queue.dvc(tmp_path, "version", timeout=0.001)
    assert time.monotonic() - started < queue.DVC_TIMEOUT_S


@pytest.mark.slow
def test_a_finished_trials_metric_is_read_at_its_experiments_commit(tmp_path):
    """Read from the experiment's commit, not the workspace; a number in exponent notation
    (which YAML 1.1 would read as a string), a nested key; no number is None."""
    repo = one_stage_project(tmp_path / "project")
    run_ok(repo, "dvc", "exp", "run", "-n", "tiny-1", "-S", "train.learning_rate=1e-05")
    run_ok(repo, "dvc", "exp", "run", "-n", "tiny-2", "-S", "train.learning_rate=0.25")
    # The workspace now holds tiny-2's metrics: tiny-1's come from its commit.
    assert queue.metric(repo, "tiny-1", "metrics/train.json", "val_accuracy") == 1e-05
    assert queue.metric(repo, "tiny-2", "metrics/train.json", "val_accuracy") == 0.25
    assert queue.metric(repo, "tiny-1", "metrics/train.json", "per.x") == 1e-05
    assert queue.metric(repo, "tiny-1", "metrics/train.json", "bad") is None  # NaN
    assert queue.metric(repo, "tiny-1", "metrics/train.json", "per.y") is None
    assert queue.metric(repo, "tiny-1", "metrics/nothing.json", "val_accuracy") is None
    assert queue.metric(repo, "tiny-3", "metrics/train.json", "val_accuracy") is None
