"""A trial DVC's worker took from the queue and never ran is run again under a new name.

DVC's idle queue workers stop on their own. One that stops just as a trial arrives takes
the trial's message and never runs it: DVC then shows the trial Running for ever, with no
worker left (seen in a search of the end-to-end tests). Here the test takes the message
itself, as that worker did (the broker moves a taken message from ``in/`` to
``processed/``), and runs a real sweep on DVC's real queue, on a pipeline of one stage
that needs no TensorFlow.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from classifier.sweeps import queue, runner
from tests.helpers import fresh_store, one_stage_project, run_ok, user_env

pytestmark = pytest.mark.slow

GRID = {
    "metric": "metrics/train.json:val_accuracy",
    "direction": "maximize",
    "workers": 1,
    "grid": {"train.learning_rate": [0.001, 0.002]},
}
BROKER = Path(".dvc/tmp/exps/celery/broker")
# The sweep takes about a minute; without the fix it never ends.
DEADLINE_S = 300


class Hung(Exception):
    pass


def _hung(signum, frame):
    raise Hung(f"the sweep did not end within {DEADLINE_S} s: is a lost trial still Running?")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = one_stage_project(tmp_path / "project")
    (repo / "sweeps").mkdir()
    (repo / "sweeps" / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    for key, value in user_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path / "store"))
    return repo


def test_a_trial_a_stopping_worker_took_and_never_ran_is_stopped_and_run_again(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    taken: list[str] = []
    queue_trial = queue.queue_trial

    def queue_then_take_the_first(root: Path, name: str, overrides, target: str) -> None:
        inbox = root / BROKER / "in"
        before = set(inbox.glob("*.msg")) if inbox.exists() else set()
        queue_trial(root, name, overrides, target)
        if not taken:  # before any worker starts: as if one took it and stopped
            [message] = set(inbox.glob("*.msg")) - before
            (root / BROKER / "processed").mkdir(exist_ok=True)
            message.rename(root / BROKER / "processed" / message.name)
            taken.append(name)

    monkeypatch.setattr(queue, "queue_trial", queue_then_take_the_first)
    # Long enough for a trial that a worker does run to reach its process under load (DVC
    # copies the repository first); short beside the sweep's minute.
    monkeypatch.setattr(runner, "LOST_S", 15.0)
    monkeypatch.setattr(runner, "LOST_CHECK_S", 0.0)

    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(DEADLINE_S)
    try:
        result = runner.run_sweep(project / "sweeps" / "grid.yaml", project)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    [lost] = taken
    rows = {row.name: row for row in result.trials}
    assert rows[lost].state == "KILLED" and rows[lost].interrupted
    assert rows[lost].error == runner.LOST_ERROR
    again = [row for row in result.trials if row.name != lost and row.params == rows[lost].params]
    assert [row.state for row in again] == ["COMPLETE"]  # the same point, under a new name
    complete = sorted(row.value for row in result.trials if row.state == "COMPLETE")
    assert complete == pytest.approx([0.001, 0.002])  # the whole grid, once each
    assert result.best is not None and result.best.value == pytest.approx(0.002)
    # DVC itself no longer calls the lost trial Running: `dvc queue kill` marked it Failed.
    assert queue.statuses(project)[lost] == queue.FAILED
    assert queue.RUNNING not in queue.statuses(project).values()
    shown = json.loads(run_ok(project, "dvc", "exp", "show", "--json"))
    names = {exp["name"] for row in shown for exp in row.get("experiments") or []}
    assert {row.name for row in again} <= names
