"""Training interrupted by Ctrl-C, SIGTERM or SIGKILL: nothing half-written, the run closed,
and ``train.resume`` ending exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from classifier.model.files import load_model
from tests.helpers import PROJECT_ROOT, fresh_store, train_command

pytestmark = pytest.mark.slow  # subprocess pipelines, or minutes of training

EPOCHS = 4
TEST_EXPERIMENT = "tests"


def write_params(path: Path, **train: object) -> Path:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"].update({"epochs": EPOCHS, **train})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_env(store: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": TEST_EXPERIMENT}


def train_to_the_end(data: Path, out: Path, params: Path, store: str) -> None:
    done = subprocess.run(
        train_command(data, out, params),
        cwd=PROJECT_ROOT,
        env=stage_env(store),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def train_until_checkpoint(
    data: Path, out: Path, params: Path, store: str, signum: int
) -> subprocess.CompletedProcess:
    """Start training, send ``signum`` once the first epoch is checkpointed, wait for the end."""
    process = subprocess.Popen(
        train_command(data, out, params),
        cwd=PROJECT_ROOT,
        env=stage_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_of(store: str, out: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(tracking_uri=store)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    return client.get_run(state["run_id"])


def weights(path: Path) -> list[np.ndarray]:
    return load_model(str(path)).get_weights()


@pytest.fixture(scope="module")
def uninterrupted(prepared_digits, tmp_path_factory):
    """The weights and history of a run of EPOCHS epochs that nothing interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    params = write_params(root / "params.yaml")
    train_to_the_end(prepared_digits, root, params, fresh_store(root))
    return weights(root / "model.keras"), (root / "history.csv").read_text()


def test_sigterm_kills_the_run_cleanly_and_resume_ends_at_the_uninterrupted_result(
    prepared_digits, uninterrupted, tmp_path
):
    store = fresh_store(tmp_path)
    params = write_params(tmp_path / "params.yaml")
    stopped = train_until_checkpoint(prepared_digits, tmp_path, params, store, signal.SIGTERM)

    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == "train: terminated"
    assert not (tmp_path / "model.keras").exists()
    assert not (tmp_path / "run.json").exists()
    run = run_of(store, tmp_path)
    assert run.info.status == "KILLED"
    checkpointed = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["epoch"]
    assert 1 <= checkpointed < EPOCHS

    train_to_the_end(prepared_digits, tmp_path, write_params(params, resume=True), store)

    resumed = run_of(store, tmp_path)
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["train.resumed"] == "true"
    client = mlflow.MlflowClient(tracking_uri=store)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    expected_weights, expected_history = uninterrupted
    for got, expected in zip(weights(tmp_path / "model.keras"), expected_weights, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "history.csv").read_text() == expected_history


def test_ctrl_c_kills_the_run_and_resume_refuses_a_checkpoint_of_other_params(
    prepared_digits, tmp_path
):
    store = fresh_store(tmp_path)
    params = write_params(tmp_path / "params.yaml")
    stopped = train_until_checkpoint(prepared_digits, tmp_path, params, store, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == "train: interrupted"
    assert run_of(store, tmp_path).info.status == "KILLED"

    done = subprocess.run(
        train_command(
            prepared_digits, tmp_path, write_params(params, resume=True, learning_rate=0.01)
        ),
        cwd=PROJECT_ROOT,
        env=stage_env(store),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"train: error: {tmp_path / 'checkpoint'} was made with other params "
        "(train.learning_rate 0.001 -> 0.01): set train.resume: false to start over, "
        "or restore those params to resume"
    )
    assert not (tmp_path / "model.keras").exists()
    assert run_of(store, tmp_path).info.status == "KILLED"


def test_sigkilled_training_run_is_closed_killed_by_the_next_run_which_resumes_it(
    prepared_digits, uninterrupted, tmp_path
):
    store = fresh_store(tmp_path)
    params = write_params(tmp_path / "params.yaml")
    killed = train_until_checkpoint(prepared_digits, tmp_path, params, store, signal.SIGKILL)

    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "model.keras").exists()
    assert run_of(store, tmp_path).info.status == "RUNNING"  # nobody could close it

    train_to_the_end(prepared_digits, tmp_path, write_params(params, resume=True), store)

    run = run_of(store, tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["process.orphaned"].endswith("ended, run open")
    for got, expected in zip(weights(tmp_path / "model.keras"), uninterrupted[0], strict=True):
        np.testing.assert_array_equal(got, expected)
