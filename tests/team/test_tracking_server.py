"""The pipeline on a team's MLflow server: basic auth, a database, artifacts proxied to S3."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    EPOCHS,
    MODEL_NAME,
    Clone,
    S3Store,
    TrackingServer,
    postgres_missing,
)

# One worker builds the team (S3, MLflow server, PostgreSQL, two clones) and runs these.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("team")]
EXPERIMENT = "image-classification"
# A client that has no S3 credentials, only the server's address and its own login.
PREDICT = """
import sys
import mlflow
import numpy as np

model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.load(sys.argv[2])
predictions = model.predict(images)
np.save(sys.argv[3], np.array(predictions["probabilities"].tolist(), dtype=np.float32))
"""


@dataclass(frozen=True)
class Tracked:
    """A `dvc repro` that logged to ``server`` as alice, and a place elsewhere to use it."""

    server: TrackingServer
    project: Clone  # where it ran
    elsewhere: Clone  # another directory and user (bob), to load the model from
    reference: Path  # a project directory holding the same model.keras and test images


@pytest.fixture(scope="module")
def tracked(server: TrackingServer, alice: Clone, bob: Clone) -> Tracked:
    """Alice's `dvc repro` on the team's server; Bob loads what it made elsewhere."""
    # Bob's S3 credentials are for DVC; MLflow must not need them.
    bob_for_mlflow = Clone(bob.path, {k: v for k, v in bob.env.items() if "AWS_" not in k})
    return Tracked(server, alice, bob_for_mlflow, bob.path)


def test_the_server_keeps_its_records_in_postgresql(tracked: Tracked):
    missing = postgres_missing()
    if missing is not None:
        pytest.skip(f"the server runs on sqlite here: {missing}")
    import psycopg

    run_id = lineage(tracked.project, "train_run.json")["run_id"]
    uri = tracked.server.backend_store_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(uri) as database:
        row = database.execute(
            "SELECT status, user_id FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchone()
    assert row == ("FINISHED", "alice")


def lineage(project: Clone, name: str) -> dict:
    return json.loads((project.path / "lineage" / name).read_text())


def test_repro_logs_a_finished_run_with_params_metrics_and_commit(tracked: Tracked):
    run_id = lineage(tracked.project, "train_run.json")["run_id"]
    with tracked.server.client("alice") as client:
        logged = client.get_run(run_id)
        history = client.get_metric_history(run_id, "val/accuracy")
    assert logged.info.status == "FINISHED"
    assert logged.info.user_id == "alice"  # the server knows who logged it
    assert logged.data.params["train.epochs"] == str(EPOCHS)
    assert len(history) == EPOCHS
    evaluation = json.loads((tracked.project.path / "metrics/evaluate.json").read_text())
    assert logged.data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"])
    head = tracked.project.out("git", "rev-parse", "HEAD~1").strip()  # before the outputs
    assert logged.data.tags["mlflow.source.git.commit"] == head


def artifact_files(client, run_id: str, folder: str) -> set[str]:
    """The paths of every file under ``folder`` of a run's artifacts, folders walked."""
    files = set()
    for item in client.list_artifacts(run_id, folder):
        files |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return files


def test_artifacts_go_through_the_server_into_the_bucket(tracked: Tracked, s3: S3Store):
    run_id = lineage(tracked.project, "train_run.json")["run_id"]
    with tracked.server.client("alice") as client:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        listed = {item.path for item in client.list_artifacts(run_id)}
        evaluation = artifact_files(client, run_id, "evaluation")
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
    assert {"history.csv", "data", "evaluation"} <= listed
    assert any(path.startswith("evaluation/insight/") for path in evaluation)

    keys = s3.keys("mlartifacts/")
    run_prefix = f"mlartifacts/{experiment.experiment_id}/{run_id}/artifacts/"
    assert f"{run_prefix}history.csv" in keys
    for path in evaluation:
        assert f"{run_prefix}{path}" in keys
    assert champion.source.startswith("models:/")  # an MLflow 3 logged model: models:/<id>
    model_id = champion.source.removeprefix("models:/")
    model_prefix = f"mlartifacts/{experiment.experiment_id}/models/{model_id}/artifacts/"
    assert f"{model_prefix}MLmodel" in keys
    assert any(key.startswith(model_prefix) and key.endswith(".keras") for key in keys)
    # Nothing of MLflow's is left in the project: no local store, no local artifacts.
    assert not (tracked.project.path / "mlflow.db").exists()
    assert not (tracked.project.path / "mlartifacts").exists()


def test_export_registers_the_champion_on_the_server(tracked: Tracked):
    registered = lineage(tracked.project, "registered_model.json")
    run_id = lineage(tracked.project, "train_run.json")["run_id"]
    assert (registered["name"], registered["alias"]) == (MODEL_NAME, "champion")
    with tracked.server.client("bob") as client:  # anyone may read: default READ
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert int(champion.version) == registered["version"]
    assert champion.run_id == run_id


def test_another_user_loads_the_champion_elsewhere_and_it_predicts_like_the_dvc_model(
    tracked: Tracked, tmp_path: Path
):
    from classifier.data.dataset import read_image_set
    from classifier.model.files import load_model

    assert not any(key.startswith("AWS_") for key in tracked.elsewhere.env)
    test_set = read_image_set(tracked.reference / "data/prepared/test")
    images = tmp_path / "images.npy"
    np.save(images, test_set.images)
    predicted = tmp_path / "probabilities.npy"
    tracked.elsewhere.run(
        sys.executable, "-c", PREDICT, f"models:/{MODEL_NAME}@champion", str(images), str(predicted)
    )
    keras_model = load_model(str(tracked.reference / "models/model.keras"))
    np.testing.assert_allclose(
        np.load(predicted), keras_model.predict(test_set.images, verbose=0), rtol=1e-5, atol=1e-6
    )


# --- authentication -----------------------------------------------------------------------

WRONG_PASSWORD = "not-alices-password"


@pytest.fixture(scope="module")
def refused(alice: Clone, server: TrackingServer, tmp_path_factory) -> tuple:
    """The train stage run as alice with a wrong password; its result and output folder."""
    out = tmp_path_factory.mktemp("refused")
    done = alice.run(
        "python",
        "-m",
        "stages.train",
        "--data",
        "data/prepared",
        "--model",
        str(out / "model.keras"),
        "--history",
        str(out / "history.csv"),
        "--metrics",
        str(out / "train.json"),
        "--run-info",
        str(out / "train_run.json"),
        "--checkpoint",
        str(out / "checkpoint"),
        check=False,
        MLFLOW_TRACKING_PASSWORD=WRONG_PASSWORD,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        LOG_LEVEL="ERROR",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONWARNINGS="ignore",
    )
    return done, out


def error_line(done: subprocess.CompletedProcess, stage: str) -> str:
    """The stage's one error line, checked to be the only one and without a traceback."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    prefix = f"{stage}: error: "
    assert lines[-1].startswith(prefix), done.stderr[-3000:]
    assert sum(line.startswith(prefix) for line in lines) == 1
    return lines[-1].removeprefix(prefix)


def test_a_wrong_password_fails_the_stage_in_one_line_naming_the_server(refused, server):
    done, out = refused
    message = error_line(done, "train")
    assert message.startswith(f"MLflow store {server.url}: ")
    assert "authenticat" in message  # "not authenticated" today; "authentication failed"
    assert list(out.iterdir()) == []  # refused before anything was written


def test_a_wrong_password_error_says_authentication_failed_for_the_user(refused, server):
    message = error_line(refused[0], "train")
    assert message.startswith(f"MLflow store {server.url}: authentication failed")
    assert "'alice'" in message
    assert "MLFLOW_TRACKING_PASSWORD" in message


def test_a_user_finds_no_champion_of_a_model_nobody_registered_yet(alice: Clone):
    done = alice.run(
        "python",
        "-c",
        "from classifier.tracking import registry, store; store.connect(); "
        "print(registry.aliased_version('not-registered-yet', 'champion'))",
        check=False,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "None"
