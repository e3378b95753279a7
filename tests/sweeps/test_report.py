"""The sweep's report and its MLflow records, on a real store, without running trials."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from classifier.sweeps import report
from classifier.sweeps.report import TrialRow
from classifier.sweeps.resources import Share
from classifier.sweeps.runner import FAILED, KILLED, Driver
from classifier.sweeps.spec import load_spec
from classifier.tracking import parents, runs
from tests.helpers import PROJECT_ROOT, TEST_EXPERIMENT, fresh_store

UI = "http://127.0.0.1:5999"


def grid_spec(folder: Path):
    path = folder / "demo.yaml"
    raw = {
        "metric": "metrics/train.json:val_loss",
        "direction": "minimize",
        "grid": {"train.learning_rate": [0.0003, 0.001, 0.003], "train.augment": ["none", "shift"]},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path, PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")


def row(number: int, state: str, rate: float, augment: str, value, **extra) -> TrialRow:
    params = {"train.learning_rate": rate, "train.augment": augment}
    run_id = extra.pop("run_id", "abcd"[number % 4] * 32)
    return TrialRow(number, f"demo-{number + 1}", state, params, value, run_id, **extra)


ROWS = [
    row(0, "COMPLETE", 0.0003, "none", 0.31),
    row(1, "COMPLETE", 0.0003, "shift", 0.12),
    row(2, "FAILED", 0.001, "none", None, error="train: error: boom"),
    row(3, "COMPLETE", 0.001, "shift", 0.2),
    row(4, "KILLED", 0.003, "none", None, run_id=None, interrupted=True),
]


def test_the_best_trial_follows_the_direction_and_skips_trials_without_a_result(tmp_path):
    spec = grid_spec(tmp_path)
    assert report.best_row(spec, ROWS).name == "demo-2"
    assert report.best_row(spec, ROWS[2:3]) is None


def test_the_report_lists_every_trial_best_first_linked_to_its_run(tmp_path):
    spec = grid_spec(tmp_path)
    importances = {"train.learning_rate": 0.7, "train.augment": 0.3}
    page_path = report.write_report(spec, tmp_path, ROWS, importances, "7", "p" * 32, UI)
    page = page_path.read_text()
    listed = re.findall(r'data-name="([^"]+)" data-value="([^"]*)"', page)
    assert listed == [
        ("demo-2", "0.12"),
        ("demo-4", "0.2"),
        ("demo-1", "0.31"),
        ("demo-3", ""),
        ("demo-5", ""),
    ]
    assert '<tr class="best" data-name="demo-2"' in page
    assert f'<a href="{UI}/#/experiments/7/runs/{"b" * 32}">demo-2</a>' in page
    assert f"{UI}/#/experiments/7/runs/{'p' * 32}" in page  # the parent run
    assert "train: error: boom" in page
    assert "(sweep stopped; run again)" in page
    assert page.count("data:image/png;base64,") == 3
    assert re.search(r"<td>train.learning_rate</td><td class=\"n\">0.700</td>", page)
    assert 'src="http' not in page and "<script" not in page  # nothing to fetch
    for figure in ("parallel.png", "metric_by_param.png", "importances.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 1000


def test_the_trials_table_holds_the_report_numbers_for_dvc_plots(tmp_path):
    spec = grid_spec(tmp_path)
    report.write_report(spec, tmp_path, ROWS, None, "7", "p" * 32, UI)
    with (tmp_path / "trials.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["experiment"] for row in table] == [row.name for row in ROWS]
    assert [row["val_loss"] for row in table] == ["0.31", "0.12", "", "0.2", ""]
    assert table[1]["train.augment"] == "shift" and table[1]["run_id"] == "b" * 32
    assert "Not enough complete trials" in (tmp_path / "report.html").read_text()


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """An open parent run in a fresh store, one for the module."""
    store = tmp_path_factory.mktemp("sweep-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", fresh_store(store))
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        with parents.parent_run("demo", {"sweep.kind": "grid"}) as (parent_id, experiment_id):
            yield parent_id, experiment_id


def driver(tmp_path: Path, parent_id: str, experiment_id: str) -> Driver:
    spec = grid_spec(tmp_path)
    return Driver(spec, tmp_path, None, parent_id, experiment_id, Share(1, ()), "0" * 40)


def test_a_trial_that_failed_before_training_gets_a_failed_child_with_the_reason(
    tmp_path, sweep_runs
):
    parent_id, experiment_id = sweep_runs
    params = {"train.learning_rate": 0.001, "train.augment": "none"}
    state, run_id = driver(tmp_path, parent_id, experiment_id).record_run(
        "demo-3", params, None, "train: error: architecture needs 18x18"
    )
    assert state == FAILED
    child = mlflow.MlflowClient().get_run(run_id)
    assert child.info.status == "FAILED"
    assert child.info.run_name == "demo-3"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["dvc.exp_name"] == "demo-3"
    assert child.data.tags["sweep.error"] == "train: error: architecture needs 18x18"
    assert child.data.params["train.learning_rate"] == "0.001"


def test_a_trial_whose_evaluate_was_killed_ends_killed_not_finished(tmp_path, sweep_runs):
    parent_id, experiment_id = sweep_runs
    client = mlflow.MlflowClient()
    trial = client.create_run(
        experiment_id, run_name="demo-1", tags={runs.TAG_PARENT_RUN: parent_id}
    )
    client.set_tag(trial.info.run_id, "evaluate.outcome", "KILLED")
    client.set_terminated(trial.info.run_id, "FINISHED")
    child = parents.children(experiment_id, parent_id)["demo-1"]
    state, run_id = driver(tmp_path, parent_id, experiment_id).record_run(
        "demo-1", {}, child, "evaluate: interrupted"
    )
    assert (state, run_id) == (KILLED, trial.info.run_id)
    recorded = client.get_run(run_id)
    assert recorded.info.status == "KILLED"
    assert recorded.data.tags["sweep.state"] == "KILLED"
    assert recorded.data.tags["sweep.name"] == "demo"
