import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from stages import evaluate
from stages.config import EvaluateParams
from stages.errors import StageError


def test_score_is_cross_entropy_and_accuracy():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    scored = evaluate.score(probabilities, labels)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 1.0]))
    assert scored == pytest.approx({"loss": expected_loss, "accuracy": 0.75})


def test_a_zero_probability_for_the_true_class_gives_a_finite_loss():
    scored = evaluate.score(np.array([[1.0, 0.0]]), np.array([1]))
    assert scored["loss"] == pytest.approx(-np.log(evaluate.PROBABILITY_EPSILON))


def test_evaluate_writes_metrics_and_confusion_and_logs_to_the_training_run(
    trained, trained_store, tmp_path
):
    metrics_path, confusion_path = tmp_path / "evaluate.json", tmp_path / "confusion.csv"
    metrics = evaluate.run(
        EvaluateParams(batch_size=64),
        trained.data_dir,
        trained.model_path,
        trained.run_info_path,
        metrics_path,
        confusion_path,
    )
    rows = pd.read_csv(confusion_path, dtype=str)
    assert len(rows) == 270
    assert list(rows.columns) == ["actual", "predicted"]
    assert metrics["accuracy"] == pytest.approx((rows["actual"] == rows["predicted"]).mean())
    assert json.loads(metrics_path.read_text()) == metrics

    client = mlflow.MlflowClient(tracking_uri=trained_store)
    run = client.get_run(trained.result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["test_loss"] == pytest.approx(metrics["loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion.csv", "confusion_matrix.png"} <= artifacts


def test_evaluate_without_a_training_run_is_a_clear_error(trained, tmp_path):
    with pytest.raises(StageError, match=r"train_run\.json: missing; run the train stage first"):
        evaluate.run(
            EvaluateParams(batch_size=64),
            trained.data_dir,
            trained.model_path,
            tmp_path / "train_run.json",
            tmp_path / "m.json",
            tmp_path / "c.csv",
        )
    assert not (tmp_path / "m.json").exists()
