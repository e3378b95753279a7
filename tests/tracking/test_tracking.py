import subprocess

import pytest

from classifier.tracking import lineage, runs, store
from tests.helpers import free_port


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store._artifact_location(store.tracking_uri()) == (tmp_path / "mlartifacts").as_uri()


def test_dvc_temporary_experiment_copies_use_the_projects_own_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert store.project_root() == tmp_path
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_environment_overrides_store_and_experiment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    assert store.tracking_uri() == "http://127.0.0.1:5999"
    assert store.experiment_name() == "team"
    assert store._artifact_location("http://127.0.0.1:5999") is None


def git(repo, *args):
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_lineage_tags_name_the_commit_dirtiness_and_dvc_experiment(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "file.txt").write_text("one")
    git(tmp_path, "add", "file.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert lineage.lineage_tags() == {
        "mlflow.source.git.commit": git(tmp_path, "rev-parse", "HEAD"),
        "git.dirty": "false",
        "dvc.exp_name": "lucky-lark",
    }
    (tmp_path / "file.txt").write_text("two")
    assert lineage.lineage_tags()["git.dirty"] == "true"


def test_outside_git_there_are_no_git_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert lineage.lineage_tags() == {}


@pytest.mark.parametrize(
    ("uri", "server"),
    [
        ("http://127.0.0.1:5000", True),
        ("HTTPS://mlflow.example.com", True),
        ("databricks", True),
        ("sqlite:///mlflow.db", False),
        ("file:///tmp/mlruns", False),
        ("/tmp/mlruns", False),
    ],
)
def test_epoch_metrics_go_asynchronously_only_to_a_server(uri, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert store.tracking_server() is server


def test_epoch_metrics_to_a_local_store_are_written_before_log_epoch_returns(mlflow_store):
    import mlflow

    with runs.training_run({"train.epochs": 1}) as run_id:
        assert runs.log_epoch({"loss": 0.5}, epoch=1, wait=False) is None
        history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_a_new_experiment_is_a_model_training_experiment_so_the_ui_opens_on_runs(mlflow_store):
    import mlflow

    experiment_id = store.connect()
    experiment = mlflow.MlflowClient(tracking_uri=mlflow_store).get_experiment(experiment_id)
    assert experiment.tags[store.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_an_older_experiment_without_a_kind_gets_marked_model_training(mlflow_store):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.create_experiment(store.experiment_name())
    assert store.TAG_EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags
    assert store.connect() == experiment_id
    kind = client.get_experiment(experiment_id).tags[store.TAG_EXPERIMENT_KIND]
    assert kind == "custom_model_development"


def test_a_tracking_server_that_does_not_answer_is_one_error_naming_it(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow alone would retry the refused connection for minutes before failing.
    with pytest.raises(store.TrackingError, match=rf"^MLflow store {uri}: .* does not answer"):
        store.connect()
