"""Multi-worker training: two real train-stage processes on 127.0.0.1 under TF_CONFIG."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from classifier.data.dataset import read_image_set
from classifier.model.files import load_model
from classifier.training.distributed import ClusterConfigError, cluster_from_env
from tests.helpers import PROJECT_ROOT, TEST_EXPERIMENT, free_port, project_params, train_command

# Its module fixtures are built once: every test here runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("multi-worker")

EPOCHS = 2
OUTPUTS = ("model.keras", "history.csv", "train.json", "run.json", "checkpoint")


def tf_config(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def start_train(data: Path, out: Path, params: Path, store: Path, config: str | None):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "MLFLOW_EXPERIMENT_NAME": TEST_EXPERIMENT,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("TF_CONFIG", None)
    if config is not None:
        env["TF_CONFIG"] = config
    return subprocess.Popen(
        train_command(data, out, params),
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    try:
        _, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def runs(store: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(TEST_EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def two_workers_and_one(prepared_digits, tmp_path_factory):
    """The same params trained by a 2-worker cluster and by one process alone."""
    root = tmp_path_factory.mktemp("multi_worker")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"].update(epochs=EPOCHS, precision="float32")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cluster = [
        start_train(
            prepared_digits,
            root / f"worker{index}",
            root / "params.yaml",
            root / "cluster.db",
            tf_config(workers, index),
        )
        for index in (0, 1)
    ]
    logs = [finish(process) for process in cluster]
    alone = start_train(
        prepared_digits, root / "alone", root / "params.yaml", root / "alone.db", None
    )
    finish(alone)
    return root, logs


@pytest.mark.slow
def test_two_workers_reach_the_single_worker_result(two_workers_and_one, prepared_digits):
    root, _ = two_workers_and_one
    chief, alone = root / "worker0", root / "alone"
    history = pd.read_csv(chief / "history.csv")
    reference = pd.read_csv(alone / "history.csv")
    assert list(history["epoch"]) == list(range(1, EPOCHS + 1))
    # Same global batches, shuffle and initial weights: every step is the single-worker step
    # but the last of each epoch, whose partial batch the workers split unevenly. The sums
    # are not in the same order, though: each worker reduces its half of a batch and the
    # all-reduce adds the halves, where one process reduces the whole batch in one oneDNN
    # kernel, blocked as oneDNN picks for the CPU. The gradients then differ in their last
    # bits, and Adam divides each by its own running scale, so where a gradient is near zero
    # that rounding moves a weight by up to the learning rate. Over the first epoch's 40
    # steps that reached 1.9e-5 of the loss on an AMD EPYC with AVX-512 BF16 (float32
    # throughout) and stays under 1e-5 on others. Another seed (shuffle and initial
    # weights) moved it by 3e-3 (1.7242 against 1.7294, train.seed 42 and 43), so 2e-4 still
    # tells the same run from another, with a margin of 10 on each side.
    np.testing.assert_allclose(history["loss"][0], reference["loss"][0], rtol=2e-4)
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=0.02)
    np.testing.assert_allclose(history["val_accuracy"], reference["val_accuracy"], atol=0.02)
    test = read_image_set(prepared_digits / "test")
    accuracies = [
        float(
            np.mean(
                np.argmax(load_model(str(out / "model.keras")).predict(test.images), 1)
                == test.labels
            )
        )
        for out in (chief, alone)
    ]
    assert accuracies[0] == pytest.approx(accuracies[1], abs=0.02)
    assert accuracies[0] > 0.8  # and it learned: a tenth would be chance


@pytest.mark.slow
def test_only_the_chief_logs_to_mlflow_and_writes_outputs(two_workers_and_one):
    root, logs = two_workers_and_one
    for name in OUTPUTS:
        assert (root / "worker0" / name).exists(), name
    assert not (root / "worker1").exists() or not any((root / "worker1").iterdir())
    [run] = runs(root / "cluster.db")
    assert run.info.status == "FINISHED"
    assert run.data.tags["train.workers"] == "2"
    assert run.data.tags["train.replicas"] == "2"  # the strategy did join the two
    assert json.loads((root / "worker0" / "run.json").read_text())["run_id"] == run.info.run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'cluster.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    assert "training as worker 0 of 2 workers, 2 replicas in sync" in logs[0]
    assert "training as worker 1 of 2 workers, 2 replicas in sync" in logs[1]
    assert "the chief writes the outputs" in logs[1]
    assert "MLflow run" not in logs[1]
    [single] = runs(root / "alone.db")
    assert "train.workers" not in single.data.tags


@pytest.mark.slow
def test_a_killed_worker_stops_the_chief_with_one_error_and_a_failed_run(prepared_digits, tmp_path):
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 100  # far longer than the test waits
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    chief, worker = (
        start_train(
            prepared_digits,
            tmp_path / f"worker{index}",
            tmp_path / "params.yaml",
            tmp_path / "cluster.db",
            tf_config(workers, index),
        )
        for index in (0, 1)
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "worker0" / "checkpoint" / "state.json").exists():
            assert chief.poll() is None, chief.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch within 300 s"
            time.sleep(0.1)
        worker.kill()
        _, stderr = chief.communicate(timeout=120)
    finally:
        chief.kill()
        worker.kill()
    assert chief.returncode == 1, stderr[-3000:]
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("train: error: multi-worker training stopped: another worker is gone (")
    )
    assert [run.info.status for run in runs(tmp_path / "cluster.db")] == ["FAILED"]
    assert not (tmp_path / "worker0" / "model.keras").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", r"TF_CONFIG: not a cluster spec \(JSONDecodeError"),
        ('{"cluster": {"worker": ["a:1"]}}', r"not a cluster spec \(KeyError: 'task'\)"),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["a:1", "b:1"], "ps": ["c:1"]},
                    "task": {"type": "worker", "index": 0},
                }
            ),
            r"task types \['ps'\] are not used by MultiWorkerMirroredStrategy",
        ),
        (
            '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
            r"task worker 2 is not in the cluster",
        ),
    ],
)
def test_a_wrong_tf_config_is_one_error_naming_it(config, message):
    with pytest.raises(ClusterConfigError, match=message):
        cluster_from_env({"TF_CONFIG": config})


def test_tf_config_names_the_chief_by_tensorflow_rules():
    two = ["a:1", "b:1"]
    assert cluster_from_env({}) is None
    assert cluster_from_env({"TF_CONFIG": tf_config(["a:1"], 0)}) is None  # one worker: alone
    assert cluster_from_env({"TF_CONFIG": tf_config(two, 0)}).is_chief
    assert not cluster_from_env({"TF_CONFIG": tf_config(two, 1)}).is_chief
    with_chief = {"chief": ["c:1"], "worker": two}
    worker0 = {"cluster": with_chief, "task": {"type": "worker", "index": 0}}
    chief = {"cluster": with_chief, "task": {"type": "chief", "index": 0}}
    assert not cluster_from_env({"TF_CONFIG": json.dumps(worker0)}).is_chief
    assert cluster_from_env({"TF_CONFIG": json.dumps(chief)}).workers == 3


def test_multi_worker_refuses_to_resume(prepared_digits, tmp_path, mlflow_store, monkeypatch):
    from stages import train

    monkeypatch.setenv("TF_CONFIG", tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0))
    with pytest.raises(ClusterConfigError, match=r"train\.resume: multi-worker training cannot"):
        train.run(
            project_params(train={"resume": True}),
            data_dir=prepared_digits,
            outputs=train.TrainOutputs.under(tmp_path),
        )
    assert runs(Path(mlflow_store.removeprefix("sqlite:///"))) == []
