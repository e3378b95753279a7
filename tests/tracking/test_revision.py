"""Finding the revision that holds the champion's results, in a real git and DVC repository."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from classifier.errors import StageError
from classifier.tracking import runs
from classifier.tracking.lineage import TAG_DVC_EXP_NAME
from classifier.tracking.revision import champion_rev
from tests.helpers import TEST_EXPERIMENT, fresh_store, init_git, run_ok, user_env

pytestmark = pytest.mark.slow

MODEL = "rev-test"

# Writes what the train stage writes, lineage/train_run.json, naming the run in $RUN_ID.
TRAIN = (
    "python -c \"import json, os; json.dump({'run_id': os.environ['RUN_ID']}, "
    "open('lineage/train_run.json', 'w'))\""
)


def make_repo(repo: Path) -> Path:
    stage = {"cmd": TRAIN, "outs": ["lineage/train_run.json"], "always_changed": True}
    (repo / "lineage").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    (repo / ".gitignore").write_text("/lineage/\n")
    run_ok(repo, "git", "init", "-q")
    run_ok(repo, "dvc", "init", "-q")
    init_git(repo)
    return repo


def run_as(repo: Path, run_id: str, *command: str) -> None:
    """``command`` in ``repo`` with the stage writing ``run_id``."""
    done = subprocess.run(
        command, cwd=repo, env={**user_env(), "RUN_ID": run_id}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def crown(run_id: str) -> None:
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(MODEL, "champion", version.version)


def training_run(**tags: str) -> str:
    with runs.training_run({"data.source": "test"}) as run_id:
        mlflow.set_tags(tags)
    return run_id


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A repository where a `dvc repro` was committed, then two experiments ran, then a
    `dvc repro` that nobody committed; the run id each of them recorded; its MLflow store."""
    root = tmp_path_factory.mktemp("revision")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", fresh_store(root))
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        repo = make_repo(root / "repo")
        recorded = {
            "committed": training_run(),
            "lucky": training_run(**{TAG_DVC_EXP_NAME: "lucky"}),
            "other": training_run(**{TAG_DVC_EXP_NAME: "other"}),
            "workspace": training_run(),
            "gone": training_run(**{TAG_DVC_EXP_NAME: "gone"}),
        }
        run_as(repo, recorded["committed"], "dvc", "repro")
        run_ok(repo, "git", "add", "dvc.lock")
        run_ok(repo, "git", "commit", "-qm", "results")
        run_as(repo, recorded["lucky"], "dvc", "exp", "run", "-n", "lucky")
        run_as(repo, recorded["other"], "dvc", "exp", "run", "-n", "other")
        run_as(repo, recorded["workspace"], "dvc", "repro")
        yield {"repo": str(repo), **recorded}


def test_a_champion_from_an_experiment_is_found_by_its_experiments_name(history):
    crown(history["lucky"])
    assert champion_rev(MODEL, Path(history["repo"])) == "lucky"


def test_a_champion_from_a_committed_repro_is_found_by_the_commit_of_its_dvc_lock(history):
    crown(history["committed"])
    repo = Path(history["repo"])
    commit = run_ok(repo, "git", "log", "-n1", "--format=%h", "--", "dvc.lock").strip()
    assert champion_rev(MODEL, repo) == commit


def test_a_champion_only_the_workspace_holds_says_to_commit_it(history):
    crown(history["workspace"])
    with pytest.raises(StageError, match=r"commit them \(git add dvc.lock && git commit\)"):
        champion_rev(MODEL, Path(history["repo"]))


def test_a_champion_whose_experiment_is_gone_is_not_named(history):
    crown(history["gone"])
    with pytest.raises(StageError, match=r"its DVC experiment gone is not in this repository"):
        champion_rev(MODEL, Path(history["repo"]))


def test_no_champion_is_one_clear_error(history):
    with pytest.raises(StageError, match="no version of never-registered is @champion"):
        champion_rev("never-registered", Path(history["repo"]))
