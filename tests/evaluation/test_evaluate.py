import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from classifier.config import EvaluateParams
from classifier.data.dataset import ImageSet, read_image_set
from classifier.errors import StageError
from classifier.evaluation import metrics
from classifier.model.files import load_model
from classifier.model.temperature import logits_of, temperature_of
from stages import evaluate


def metrics_module_ece(probabilities, labels):
    return metrics.calibration_bins(probabilities, labels)[0]


PICTURES = {"confusion.png", "reliability.png", "curves.png", "misclassified.png"}
TABLES = {"confusion.csv", "predictions.csv", "per_class.csv", "calibration.csv"}
INSIGHT = "insight"  # Grad-CAM, feature maps, filters: tests/evaluation/test_insight.py


def test_score_is_cross_entropy_and_accuracy():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    scored = metrics.score(probabilities, labels)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 1.0]))
    assert scored == pytest.approx({"loss": expected_loss, "accuracy": 0.75})


def test_a_zero_probability_for_the_true_class_gives_a_finite_loss():
    scored = metrics.score(np.array([[1.0, 0.0]]), np.array([1]))
    assert scored["loss"] == pytest.approx(-np.log(metrics.PROBABILITY_EPSILON))


def test_per_class_metrics_follow_their_definitions():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 1])
    table = metrics.per_class_table(labels, predicted, ("a", "b", "c")).set_index("class")
    assert table.loc["a"].tolist() == pytest.approx([1.0, 2 / 3, 0.8, 3])
    assert table.loc["b", "precision"] == pytest.approx(2 / 4)
    assert table.loc["c"].tolist() == pytest.approx([0.0, 0.0, 0.0, 1])  # never predicted


def test_expected_calibration_error_weights_each_bins_gap():
    # Two confident right answers (0.95) and two hesitant ones, one right (0.55).
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    ece, bins = metrics.calibration_bins(probabilities, labels, bins=10)
    assert bins.loc[9, ["confidence", "accuracy", "count"]].tolist() == pytest.approx([0.95, 1, 2])
    assert bins.loc[5, ["confidence", "accuracy", "count"]].tolist() == pytest.approx([0.55, 1, 2])
    assert ece == pytest.approx((2 * 0.05 + 2 * 0.45) / 4)


def test_top_k_accuracy_only_with_more_than_five_classes():
    rng = np.random.default_rng(0)
    few = rng.dirichlet(np.ones(5), size=20)
    many = rng.dirichlet(np.ones(10), size=20)
    labels = np.arange(20) % 5
    per_class = pd.DataFrame({"precision": [1.0], "recall": [1.0], "f1": [1.0]})
    assert "top3_accuracy" not in metrics.headline_metrics(few, labels, per_class, 0.0)
    top3 = metrics.headline_metrics(many, labels, per_class, 0.0)["top3_accuracy"]
    in_top3 = [label in np.argsort(-row)[:3] for row, label in zip(many, labels, strict=True)]
    assert top3 == pytest.approx(np.mean(in_top3))


def test_most_confident_mistakes_come_first():
    test = ImageSet(
        np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1), np.array([0, 0, 1, 1]), ("a", "b")
    )
    probabilities = np.array([[0.4, 0.6], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    images, captions = metrics.most_confident_mistakes(test, probabilities, count=5)
    assert images[:, 0, 0, 0].tolist() == [1, 3, 0]
    assert captions[0] == "#1: a as b (90%)"


def test_confusion_counts_hold_every_class_pair_even_classes_never_predicted():
    test = ImageSet(
        images=np.zeros((5, 2, 2, 1), dtype=np.uint8),
        labels=np.array([0, 0, 1, 2, 2]),
        class_names=("cat", "dog", "fox"),
    )
    # "fox" is never predicted and "dog" never right: both still get a full row and column.
    counts = metrics.confusion_counts(test, np.array([0, 0, 0, 1, 0]))
    assert len(counts) == 9
    table = counts.pivot(index="actual", columns="predicted", values="count")
    assert table.loc[["cat", "dog", "fox"], ["cat", "dog", "fox"]].to_numpy().tolist() == [
        [2, 0, 0],
        [1, 0, 0],
        [1, 1, 0],
    ]


@pytest.mark.slow
def test_evaluate_writes_metrics_tables_and_pictures_and_logs_them(
    trained, trained_store, tmp_path
):
    metrics_path, plots_dir = tmp_path / "evaluate.json", tmp_path / "plots"
    metrics = evaluate.run(
        EvaluateParams(batch_size=64),
        data_dir=trained.data_dir,
        model_path=trained.model_path,
        run_info_path=trained.run_info_path,
        history_path=trained.history_path,
        metrics_path=metrics_path,
        plots_dir=plots_dir,
    )
    assert {p.name for p in plots_dir.iterdir()} == PICTURES | TABLES | {INSIGHT}
    # The figures, recomputed here from the model and the *test* split (val has 270 too).
    test = read_image_set(trained.data_dir / "test")
    probabilities = load_model(str(trained.model_path)).predict(test.images, verbose=0)
    predicted, names = probabilities.argmax(1), np.array(test.class_names)
    rows = pd.read_csv(plots_dir / "predictions.csv", dtype=str)
    assert rows["actual"].tolist() == names[test.labels].tolist()
    assert rows["predicted"].tolist() == names[predicted].tolist()
    counts = pd.read_csv(plots_dir / "confusion.csv", dtype={"actual": str, "predicted": str})
    assert len(counts) == len(names) ** 2
    for actual, guessed, count in counts.itertuples(index=False):
        assert count == np.sum((names[test.labels] == actual) & (names[predicted] == guessed))
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == test.labels))
    confidence, correct = probabilities.max(1), predicted == test.labels
    bins = np.minimum((confidence * 10).astype(int), 9)  # equal-width bins; no edge cases here
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.sum(bins == b)
        for b in range(10)
        if np.any(bins == b)
    ) / len(test.labels)
    assert metrics["ece"] == pytest.approx(ece, abs=1e-6)
    # The temperature built in by training, and what ECE would be without it.
    model = load_model(str(trained.model_path))
    assert metrics["temperature"] == pytest.approx(temperature_of(model))
    logits = logits_of(model, test.images)
    raw = np.exp(logits - logits.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    assert metrics["ece_uncalibrated"] == pytest.approx(
        metrics_module_ece(raw, test.labels), abs=1e-6
    )
    top3 = np.argsort(-probabilities, axis=1)[:, :3]
    assert metrics["top3_accuracy"] == pytest.approx(np.mean((top3 == test.labels[:, None]).any(1)))
    per_class = pd.read_csv(plots_dir / "per_class.csv")
    assert metrics["macro_f1"] == pytest.approx(per_class["f1"].mean())
    assert per_class["support"].tolist() == np.bincount(test.labels, minlength=10).tolist()
    assert json.loads(metrics_path.read_text()) == metrics
    for picture in PICTURES:
        with Image.open(plots_dir / picture) as image:
            assert image.format == "PNG" and min(image.size) >= 300

    client = mlflow.MlflowClient(tracking_uri=trained_store)
    run = client.get_run(trained.result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["test/ece"] == pytest.approx(metrics["ece"])
    logged = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == PICTURES | TABLES | {INSIGHT}


def test_evaluate_without_a_training_run_is_a_clear_error(trained, tmp_path):
    with pytest.raises(StageError, match=r"train_run\.json: missing; run the train stage first"):
        evaluate.run(
            EvaluateParams(batch_size=64),
            data_dir=trained.data_dir,
            model_path=trained.model_path,
            run_info_path=tmp_path / "train_run.json",
            history_path=trained.history_path,
            metrics_path=tmp_path / "m.json",
            plots_dir=tmp_path / "p",
        )
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p").exists()
