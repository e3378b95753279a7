"""Lineage from dvc.lock: one code version per stage and the data's md5 as tags, the rest
as an artifact."""

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
import yaml

from classifier.errors import StageError
from classifier.tracking import description, lineage, runs
from tests.helpers import TEST_EXPERIMENT

DATA_MD5 = "feedbeef0123456789abcdef01234567.dir"


def write_lock(folder, model_md5, train_py="a1" * 16, data=DATA_MD5):
    """A dvc.lock whose train stage recorded these md5s, and evaluate read the same model."""
    deps = [
        {"path": "stages/train.py", "md5": train_py, "size": 10},
        {"path": "classifier/model", "md5": "c0de" * 8 + ".dir", "size": 20, "nfiles": 3},
        {"path": "data/prepared", "md5": data, "size": 30, "nfiles": 9},
        {"path": "reports/data.md", "md5": "d0c5" * 8, "size": 5},
    ]
    outs = [{"path": "models/model.keras", "md5": model_md5, "size": 40}]
    evaluate = [
        {"path": "stages/evaluate.py", "md5": "e" * 32, "size": 10},
        {"path": "data/prepared", "md5": data, "size": 30, "nfiles": 9},
        {"path": "models/model.keras", "md5": model_md5, "size": 40},
    ]
    lock = {
        "schema": "2.0",
        "stages": {"train": {"deps": deps, "outs": outs}, "evaluate": {"deps": evaluate}},
    }
    path = folder / "dvc.lock"
    path.write_text(yaml.safe_dump(lock))
    return path


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "models" / "model.keras"
    path.parent.mkdir()
    path.write_bytes(b"weights")
    return path.relative_to(tmp_path)


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_stage_gets_one_code_version_tag_and_the_data_md5(tmp_path, model):
    entry = lineage.lock_entry(write_lock(tmp_path, md5(model)), "train", model)
    tags = entry.tags()
    assert tags == {"code.train": entry.code_version(), "data": DATA_MD5}
    assert len(tags["code.train"]) == lineage.CODE_VERSION_CHARS
    assert int(tags["code.train"], 16) >= 0


def test_the_code_version_follows_the_code_and_not_the_data(tmp_path, model):
    def code(**changes):
        lock = write_lock(tmp_path, md5(model), **changes)
        return lineage.lock_entry(lock, "train", model).code_version()

    assert code(data="0" * 32 + ".dir") == code()
    assert code(train_py="b2" * 16) != code()


def test_a_lock_that_does_not_describe_the_model_gives_no_versions(tmp_path, model):
    lock = write_lock(tmp_path, "0" * 32)  # written for another model
    assert lineage.lock_entry(lock, "train", model) is None
    assert lineage.lock_entry(tmp_path / "missing.lock", "train", model) is None


def test_lineage_tags_the_run_and_logs_every_md5_as_an_artifact(tmp_path, model, mlflow_store):
    lock = write_lock(tmp_path, md5(model))
    with runs.training_run({"train.epochs": 1}) as run_id:
        pass
    tags = runs.finished_run(run_id).record_lineage(lock, ["train", "evaluate"], model)
    run = mlflow.MlflowClient().get_run(run_id)
    assert {key: run.data.tags[key] for key in tags} == tags
    assert set(tags) == {"code.train", "code.evaluate", "data"}
    assert not [key for key in run.data.tags if key.startswith("dvc.train")]
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="lineage/dvc_lock.json", dst_path=str(tmp_path / "dl")
    )
    recorded = json.loads(Path(local).read_text())
    assert recorded["stages"]["train"]["deps"]["stages/train.py"] == "a1" * 16
    assert recorded["stages"]["train"]["outs"] == {"models/model.keras": md5(model)}
    assert recorded["tags"] == tags


def test_a_run_describes_what_it_is_and_how_it_ended(mlflow_store):
    params = {"train.architecture": "small_cnn", "data.source": "digits", "train.epochs": 3}
    with runs.training_run(params) as run_id:
        note = mlflow.MlflowClient().get_run(run_id).data.tags[description.TAG_NOTE]
    what, outcome = note.split("\n\n")
    assert "small_cnn" in what and "`digits`" in what and "3 epochs" in what
    assert f"MLflow experiment `{TEST_EXPERIMENT}`" in what
    assert outcome == description.TRAINING
    runs.finished_run(run_id).describe(description.evaluated(243, 270))
    note = mlflow.MlflowClient().get_run(run_id).data.tags[description.TAG_NOTE]
    assert note.split("\n\n") == [
        what,
        "Test accuracy 90.0 % (95 % CI 85.8 % to 93.3 %) on 270 test images; not registered yet.",
    ]


def test_a_failed_stage_says_so_and_why_in_the_run_description(mlflow_store):
    with runs.training_run({"train.architecture": "small_cnn"}) as run_id:
        pass
    with pytest.raises(StageError), runs.finished_run(run_id).stage("export"):
        raise StageError("digits-cnn@champion answers other classes\nsecond line")
    note = mlflow.MlflowClient().get_run(run_id).data.tags[description.TAG_NOTE]
    assert note.split("\n\n")[1] == "FAILED in export: digits-cnn@champion answers other classes"
    with pytest.raises(RuntimeError), runs.training_run({"train.epochs": 1}) as failed_id:
        raise RuntimeError("out of memory")
    run = mlflow.MlflowClient().get_run(failed_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[description.TAG_NOTE].endswith("\n\nFAILED in train: out of memory")
