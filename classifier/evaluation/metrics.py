"""Test-set metrics: loss, accuracy, per-class scores, calibration, the worst mistakes.

The headline metrics (a DVC metrics file and the MLflow run): loss, accuracy, macro
precision, recall and F1, top-3 accuracy when there are more than 5 classes, and the
expected calibration error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from classifier.data.dataset import ImageSet

# Keras clips probabilities by this before taking the log in its cross-entropy.
PROBABILITY_EPSILON = 1e-7
TOP_K = 3
TOP_K_MIN_CLASSES = 6  # top-3 accuracy says little with 5 classes or fewer
CALIBRATION_BINS = 10
MISCLASSIFIED_SHOWN = 24


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy loss and accuracy of predicted class probabilities."""
    picked = probabilities[np.arange(len(labels)), labels]
    loss = -np.mean(np.log(np.clip(picked, PROBABILITY_EPSILON, 1.0)))
    accuracy = np.mean(probabilities.argmax(axis=1) == labels)
    return {"loss": float(loss), "accuracy": float(accuracy)}


def per_class_table(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class (scikit-learn's definitions)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(class_names)), zero_division=0
    )
    return pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )


def calibration_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[float, pd.DataFrame]:
    """Expected calibration error and, per confidence bin, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for bin_index in range(bins):
        members = index == bin_index
        count = int(members.sum())
        rows.append(
            {
                "bin": bin_index,
                "confidence": float(confidence[members].mean())
                if count
                else (edges[bin_index] + edges[bin_index + 1]) / 2,
                "accuracy": float(correct[members].mean()) if count else 0.0,
                "count": count,
            }
        )
    table = pd.DataFrame(rows)
    gaps = (table["accuracy"] - table["confidence"]).abs() * table["count"]
    return float(gaps.sum() / max(1, len(labels))), table


def headline_metrics(
    probabilities: np.ndarray, labels: np.ndarray, per_class: pd.DataFrame, ece: float
) -> dict[str, float]:
    """The numbers that go to `dvc exp show` and the MLflow run."""
    from sklearn.metrics import top_k_accuracy_score

    metrics = score(probabilities, labels)
    metrics.update(
        macro_precision=float(per_class["precision"].mean()),
        macro_recall=float(per_class["recall"].mean()),
        macro_f1=float(per_class["f1"].mean()),
        ece=ece,
    )
    classes = probabilities.shape[1]
    if classes >= TOP_K_MIN_CLASSES:
        metrics[f"top{TOP_K}_accuracy"] = float(
            top_k_accuracy_score(labels, probabilities, k=TOP_K, labels=range(classes))
        )
    return metrics


def prediction_rows(test: ImageSet, predicted: np.ndarray) -> pd.DataFrame:
    """One row per test image: its actual and predicted class name."""
    names = np.asarray(test.class_names)
    return pd.DataFrame({"actual": names[test.labels], "predicted": names[predicted]})


def confusion_counts(test: ImageSet, predicted: np.ndarray) -> pd.DataFrame:
    """How many test images of each actual class got each predicted class: one row for
    every (actual, predicted) pair, zeros included, so DVC's matrix shows every class even
    where none was predicted (.dvc/plots/confusion_counts.json sums ``count``)."""
    classes = len(test.class_names)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (test.labels, predicted), 1)
    actual, guessed = np.meshgrid(np.arange(classes), np.arange(classes), indexing="ij")
    names = np.asarray(test.class_names)
    return pd.DataFrame(
        {
            "actual": names[actual.ravel()],
            "predicted": names[guessed.ravel()],
            "count": matrix.ravel(),
        }
    )


def most_confident_mistakes(
    test: ImageSet, probabilities: np.ndarray, count: int
) -> tuple[np.ndarray, list[str]]:
    """The misclassified test images the model was surest of, with captions."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != test.labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:count]
    names = test.class_names
    captions = [
        f"#{i}: {names[test.labels[i]]} as {names[guess]} ({probabilities[i, guess]:.0%})"
        for i, guess in zip(order, predicted[order], strict=True)
    ]
    return test.images[order], captions
