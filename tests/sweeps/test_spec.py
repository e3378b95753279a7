"""The sweep spec: checked as strictly as params.yaml, every mistake one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from classifier.sweeps.spec import SpecError, load_spec
from tests.helpers import PROJECT_ROOT
from tools import sweep as sweep_tool

BASE = {"metric": "metrics/evaluate.json:accuracy", "direction": "maximize"}


def write_spec(folder: Path, name: str = "trial", **fields: object) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fields}, sort_keys=False))
    return path


def load(path: Path):
    return load_spec(path, PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")


def error_of(path: Path) -> str:
    with pytest.raises(SpecError) as raised:
        load(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_the_shipped_example_is_a_grid_of_six_trials_on_two_workers():
    spec = load(PROJECT_ROOT / "sweeps" / "example.yaml")
    assert (spec.name, spec.kind, spec.trials, spec.workers) == ("example", "grid", 6, 2)
    assert spec.keys == ["train.learning_rate", "train.batch_size"]
    assert spec.grid_points()[:2] == [
        {"train.learning_rate": 0.0003, "train.batch_size": 32},
        {"train.learning_rate": 0.0003, "train.batch_size": 64},
    ]
    assert spec.metric == "metrics/train.json:val_loss" and spec.direction == "minimize"
    assert spec.target == "train"  # trials stop at the stage that writes the metric


@pytest.mark.parametrize(
    ("metric", "target"),
    [("metrics/train.json:val_accuracy", "train"), ("metrics/evaluate.json:macro_f1", "evaluate")],
)
def test_trials_run_up_to_the_stage_that_writes_the_metric(tmp_path, metric, target):
    spec = load(write_spec(tmp_path, metric=metric, grid={"train.batch_size": [32, 64]}))
    assert spec.target == target


def test_grid_ranges_expand_by_step_by_count_and_on_a_log_scale(tmp_path):
    path = write_spec(
        tmp_path,
        grid={
            "train.batch_size": {"low": 32, "high": 96, "step": 32},
            "train.learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "num": 3, "log": True},
        },
        set={"train.epochs": 2},
    )
    spec = load(path)
    assert spec.params[0].choices == (32, 64, 96)
    assert spec.params[1].choices == pytest.approx((1e-4, 1e-3, 1e-2))
    assert spec.trials == 9
    assert spec.overrides(spec.grid_points()[0])["train.epochs"] == 2


def test_a_search_takes_ranges_of_the_params_type_and_lists_of_choices(tmp_path):
    path = write_spec(
        tmp_path,
        search={
            "trials": 5,
            "params": {
                "train.learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                "train.epochs": {"low": 1, "high": 5},
                "train.augment": ["none", "shift"],
            },
        },
    )
    spec = load(path)
    rate, epochs, augment = spec.params
    assert (rate.integer, rate.log, epochs.integer, epochs.low, epochs.high) == (
        False, True, True, 1, 5,
    )  # fmt: skip
    assert augment.choices == ("none", "shift")
    assert spec.trials == 5 and spec.kind == "search"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"grid": {"train.learnig_rate": [0.001]}},
            "grid: train.learnig_rate: unknown param (not in ",
        ),
        (
            {"grid": {"train.learning_rate": [0.001, 20]}},
            "grid point train.learning_rate=20: ",
        ),
        ({"grid": {}}, "grid: empty; name at least one param to vary"),
        ({"grid": {"train.batch_size": []}}, "grid: train.batch_size: no values"),
        (
            {"search": {"trials": 0, "params": {"train.batch_size": [32]}}},
            "search.trials: input should be greater than or equal to 1, got 0",
        ),
        ({"grid": {"train.batch_size": [32]}, "colour": "red"}, "colour: unknown key"),
        (
            {"grid": {"train.batch_size": {"low": 1, "hi": 3}}},
            "grid: train.batch_size: high: missing key; hi: unknown key",
        ),
        (
            {"search": {"trials": 2, "params": {"train.learning_rate": {"low": 0.1, "high": 20}}}},
            "search.params train.learning_rate=20",
        ),
        ({"grid": {"train.batch_size": [32]}, "search": {"trials": 1, "params": {}}}, "either"),
        (
            {"grid": {"train.batch_size": [32]}, "metric": "metrics/promotion.json:promoted"},
            "which trials do not run",
        ),
        ({"grid": {"train.batch_size": [32]}, "metric": "accuracy"}, "expected <metrics file>"),
    ],
    ids=[
        "unknown-param",
        "value-params-rejects",
        "empty-grid",
        "no-values",
        "budget-0",
        "unknown-key",
        "range-typo",
        "search-bound-rejected",
        "grid-and-search",
        "export-metric",
        "bare-metric",
    ],
)
def test_a_bad_spec_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, fields, expected):
    assert expected in error_of(write_spec(tmp_path, **fields))


def test_a_value_params_yaml_would_reject_quotes_its_reason(tmp_path):
    message = error_of(write_spec(tmp_path, grid={"train.learning_rate": [0.001, 20]}))
    assert message.endswith(
        "params.yaml would reject it: train.learning_rate: input should be less than or "
        "equal to 10, got 20"
    )


def test_the_command_line_reports_a_bad_spec_in_one_line_and_exit_code_1(tmp_path, capsys):
    path = write_spec(tmp_path, grid={"train.batch_size": []})
    assert sweep_tool.main([str(path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error == f"sweep: error: {path}: grid: train.batch_size: no values; give at least one"


def test_the_command_line_explains_itself():
    with pytest.raises(SystemExit) as exited:
        sweep_tool.parse_args(["--help"])
    assert exited.value.code == 0
