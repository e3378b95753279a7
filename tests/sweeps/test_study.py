"""The sweep's record: an Optuna study in a journal file that a stopped sweep resumes from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from classifier.sweeps import study
from classifier.sweeps.spec import SpecError, load_spec
from tests.helpers import PROJECT_ROOT


def spec_of(folder: Path, **fields: object):
    path = folder / "trial.yaml"
    raw = {"metric": "metrics/evaluate.json:accuracy", "direction": "maximize", **fields}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path, PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")


SEARCH = {
    "trials": 6,
    "params": {
        "train.learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "train.batch_size": [32, 64],
    },
}


def test_a_grid_is_a_study_with_every_point_waiting_in_order(tmp_path):
    spec = spec_of(tmp_path, grid={"train.batch_size": [16, 32], "train.epochs": [1, 2]})
    record = study.open_study(spec, tmp_path / "sweep")
    points = [t.system_attrs["fixed_params"] for t in record.trials]
    assert points == spec.grid_points()
    assert all(trial.state == TrialState.WAITING for trial in record.trials)
    asked = record.ask(study.distributions(spec))
    assert asked.params == spec.grid_points()[0]
    assert study.trial_name(spec, asked.number) == "trial-1"


def test_reopening_a_grid_adds_no_point_twice(tmp_path):
    spec = spec_of(tmp_path, grid={"train.batch_size": [16, 32]})
    first = study.open_study(spec, tmp_path / "sweep")
    trial = first.ask(study.distributions(spec))
    first.tell(trial, 0.5)
    again = study.open_study(spec, tmp_path / "sweep")
    assert len(again.trials) == 2
    assert [t.state for t in again.trials] == [TrialState.COMPLETE, TrialState.WAITING]


def test_a_resumed_search_keeps_finished_trials_and_never_draws_them_again(tmp_path):
    spec = spec_of(tmp_path, search=SEARCH)
    folder = tmp_path / "sweep"
    first = study.open_study(spec, folder)
    distributions = study.distributions(spec)
    done = []
    for value in (0.5, 0.6):
        trial = first.ask(distributions)
        first.tell(trial, value)
        done.append(trial.params)
    left_running = first.ask(distributions)  # asked, then the sweep crashed
    resumed = study.open_study(spec, folder)
    assert [t.value for t in resumed.trials[:2]] == [0.5, 0.6]
    assert [t.number for t in study.running(resumed)] == [left_running.number]
    assert study.counted(resumed) == 2
    fresh = resumed.ask(distributions)
    assert fresh.number == 3
    assert fresh.params not in [*done, left_running.params]


def test_a_trial_the_sweep_interrupted_runs_again_and_does_not_count(tmp_path):
    spec = spec_of(tmp_path, search=SEARCH)
    record = study.open_study(spec, tmp_path / "sweep")
    distributions = study.distributions(spec)
    stopped = record.ask(distributions)
    stopped.set_user_attr(study.ATTR_INTERRUPTED, True)
    record.tell(stopped, state=TrialState.FAIL)
    record.enqueue_trial(stopped.params)
    failed = record.ask(distributions)
    assert failed.params == stopped.params  # the interrupted point comes first
    record.tell(failed, state=TrialState.FAIL)  # a real failure counts
    assert study.counted(record) == 1


def test_a_changed_spec_does_not_resume_another_sweeps_record(tmp_path):
    study.open_study(spec_of(tmp_path, grid={"train.batch_size": [16, 32]}), tmp_path / "sweep")
    changed = spec_of(tmp_path, grid={"train.batch_size": [16, 64]})
    with pytest.raises(SpecError, match="holds sweep 'trial' of a different spec"):
        study.open_study(changed, tmp_path / "sweep")
    more_workers = spec_of(tmp_path, grid={"train.batch_size": [16, 32]}, workers=4)
    study.open_study(more_workers, tmp_path / "sweep")  # workers may change


def test_importances_need_three_results_and_name_each_varied_param(tmp_path):
    spec = spec_of(tmp_path, search=SEARCH)
    record = study.open_study(spec, tmp_path / "sweep")
    distributions = study.distributions(spec)
    for value in (0.1, 0.9):
        record.tell(record.ask(distributions), value)
    assert study.importances(record) is None
    for value in (0.3, 0.5, 0.7):
        record.tell(record.ask(distributions), value)
    found = study.importances(record)
    assert set(found) <= {"train.learning_rate", "train.batch_size"}
    assert sum(found.values()) == pytest.approx(1.0)
