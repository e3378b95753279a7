"""What the MLflow UI shows, read from the REST API and files it loads, of a real `mlflow ui`.

These tests check the server's answers (the runs, metrics, pictures and model the UI's pages
request), not the rendered pages: no browser runs here.
"""

import json
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from classifier.config import EvaluateParams
from classifier.processes import ProcessGroup, running
from stages import evaluate
from tests.helpers import PROJECT_ROOT, TEST_EXPERIMENT, TRAIN_EPOCHS, free_port, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow-ui")]
MODEL_NAME = "test-serving"  # the session's `registered` fixture
STARTUP_SECONDS = 90


@pytest.fixture(scope="module")
def ui_server(trained, registered, tmp_path_factory) -> Iterator[tuple[str, ProcessGroup]]:
    """A store with an evaluated run and its registered model, served by `python -m tools.ui`
    as `make ui` runs it (the registration is the session's, without export's format
    checks). Yields the UI's address and its process group."""
    out = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        evaluate.run(
            EvaluateParams(batch_size=256),
            data_dir=trained.data_dir,
            model_path=trained.model_path,
            run_info_path=trained.run_info_path,
            history_path=trained.history_path,
            metrics_path=out / "evaluate.json",
            plots_dir=out / "plots",
        )
    port = free_port()
    command = [sys.executable, "-m", "tools.ui", "--host", "127.0.0.1", "--port", str(port)]
    env = stage_env(trained.store_uri, PYTHONPATH=str(PROJECT_ROOT))
    base = f"http://127.0.0.1:{port}"
    with running(
        "make ui", command, cwd=out, env=env, log_path=out / "ui.log",
        health_url=f"{base}/health", timeout=STARTUP_SECONDS,
    ) as group:  # fmt: skip
        yield base, group


@pytest.fixture(scope="module")
def ui(ui_server) -> str:
    return ui_server[0]


def get(base: str, route: str, **query) -> bytes:
    url = f"{base}{route}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    if body is None:
        return json.loads(get(base, f"/api/2.0/mlflow/{endpoint}", **query))
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_server_answers_the_run_with_params_metrics_and_history(ui, trained):
    experiment = api(ui, "experiments/get-by-name", experiment_name=TEST_EXPERIMENT)["experiment"]
    runs = api(ui, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    run = next(r for r in runs if r["info"]["run_id"] == trained.result.run_id)
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == str(TRAIN_EPOCHS)
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"val/accuracy", "test/accuracy", "test/macro_f1", "test/ece"} <= metrics
    history = api(
        ui, "metrics/get-history", run_id=trained.result.run_id, metric_key="val/accuracy"
    )
    assert [m["step"] for m in history["metrics"]] == list(range(1, TRAIN_EPOCHS + 1))


def test_the_ui_server_serves_the_evaluation_pictures(ui, trained):
    listed = api(ui, "artifacts/list", run_id=trained.result.run_id, path="evaluation")
    names = {f["path"] for f in listed["files"]}
    assert {"evaluation/confusion.png", "evaluation/misclassified.png"} <= names
    picture = get(
        ui, "/get-artifact", path="evaluation/confusion.png", run_uuid=trained.result.run_id
    )
    assert picture.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_ui_server_answers_the_registered_model_with_its_alias(ui, trained, registered):
    model = api(ui, "registered-models/get", name=MODEL_NAME)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    assert aliases == {"champion": str(registered["version"])}
    version = api(ui, "model-versions/get", name=MODEL_NAME, version=str(registered["version"]))
    version = version["model_version"]
    assert version["run_id"] == trained.result.run_id
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags["promotion.decision"] == "champion"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # it ended meanwhile
        return ""


def test_the_ui_runs_without_mlflows_job_runner(ui_server):
    """MLflow launches its job runner right after the server, before the server can answer
    /health: none of the UI's processes is that runner or one of its consumers."""
    _, group = ui_server
    commands = [command_line(pid) for pid in group.members()]
    assert any("mlflow" in command for command in commands), commands
    assert not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c]
