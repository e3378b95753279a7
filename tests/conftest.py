"""Shared fixtures: real data from scikit-learn, real TensorFlow, real MLflow on sqlite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.config import Params, parse_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEST_EXPERIMENT = "tests"


def project_params(**overrides: dict[str, Any]) -> Params:
    """The project's params.yaml with some keys of some sections replaced, validated."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section].update(values)
    return parse_params(raw, "params.yaml (test overrides)")


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow sqlite store that the stages log to; returns its URI."""
    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return uri


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, downloaded and preprocessed with the project's params."""
    from stages import download, preprocess

    root = tmp_path_factory.mktemp("digits")
    params = project_params()
    download.run(params.data, root / "raw")
    preprocess.run(params.preprocess, root / "raw", root / "prepared")
    return root / "prepared"


@dataclass(frozen=True)
class TrainedRun:
    """A model trained once per session by the real train stage, and where it wrote."""

    params: Params
    store_uri: str
    data_dir: Path
    model_path: Path
    history_path: Path
    metrics_path: Path
    run_info_path: Path
    result: Any


TRAIN_EPOCHS = 3
DVC_EXPERIMENT = "test-exp-name"


@pytest.fixture(scope="session")
def trained(prepared_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    from stages import train

    root = tmp_path_factory.mktemp("trained")
    params = project_params(train={"epochs": TRAIN_EPOCHS})
    outputs = {
        "model_path": root / "models" / "model.keras",
        "history_path": root / "plots" / "history.csv",
        "metrics_path": root / "metrics" / "train.json",
        "run_info_path": root / "lineage" / "train_run.json",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(root))
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        patch.setenv("DVC_EXP_NAME", DVC_EXPERIMENT)
        result = train.run(params, prepared_digits, *outputs.values())
    return TrainedRun(params, sqlite_uri(root), prepared_digits, result=result, **outputs)


@pytest.fixture
def trained_store(trained: TrainedRun, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the stages at the store holding the session's trained run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return trained.store_uri
