"""Stage ``evaluate``: score the trained model on the held-out test split, in depth.

Writes the headline metrics (a DVC metrics file): loss, accuracy, macro precision,
recall and F1, top-3 accuracy when there are more than 5 classes, and the expected
calibration error. A plots folder holds the tables behind them (per-test-image confusion
rows, per-class metrics, calibration bins) and the pictures: confusion matrix,
reliability diagram, training curves and the most confidently misclassified images.
Everything also goes to the training run in MLflow.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages import tracking
from stages.atomic import atomic_path, write_json
from stages.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from stages.config import EvaluateParams, load_params
from stages.dataset import ImageSet, read_image_set

log = logging.getLogger(__name__)

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


def confusion_rows(test: ImageSet, predicted: np.ndarray) -> pd.DataFrame:
    """One row per test image: its actual and predicted class name (DVC's confusion input)."""
    names = np.asarray(test.class_names)
    return pd.DataFrame({"actual": names[test.labels], "predicted": names[predicted]})


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


def run(
    cfg: EvaluateParams,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    history_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    lock_path: Path = Path("dvc.lock"),
) -> dict[str, float]:
    """Score ``model_path`` on the test split; write metrics and the plots folder.

    The training run also gets the hashes ``lock_path`` records for its data and model.
    """
    from stages import plots
    from stages.model import load_model

    run_id = tracking.read_run_id(run_info_path)
    test = read_image_set(Path(data_dir) / "test")
    model = load_model(str(model_path))
    probabilities = model.predict(test.images, batch_size=cfg.batch_size, verbose=0)
    predicted = probabilities.argmax(axis=1)
    per_class = per_class_table(test.labels, predicted, test.class_names)
    ece, calibration = calibration_bins(probabilities, test.labels)
    metrics = headline_metrics(probabilities, test.labels, per_class, ece)
    rows = confusion_rows(test, predicted)
    mistakes, captions = most_confident_mistakes(test, probabilities, MISCLASSIFIED_SHOWN)
    figures = {
        "confusion.png": plots.confusion_figure(rows, test.class_names),
        "reliability.png": plots.reliability_figure(calibration, ece),
        "curves.png": plots.curves_figure(pd.read_csv(history_path)),
        "misclassified.png": plots.image_grid_figure(
            mistakes, captions, "Most confidently misclassified test images"
        ),
    }

    with tracking.resumed_run(run_id):
        # The training run's data and model hashes, as DVC recorded them once train ended.
        tracking.set_tags(tracking.dvc_lock_tags(lock_path, "train", model_path))
        with atomic_path(plots_dir, directory=True) as tmp:
            rows.to_csv(tmp / "confusion.csv", index=False)
            per_class.to_csv(tmp / "per_class.csv", index=False, float_format="%.6f")
            calibration.to_csv(tmp / "calibration.csv", index=False, float_format="%.6f")
            for name, figure in figures.items():
                plots.save(figure, tmp / name)
        write_json(metrics_path, metrics)
        tracking.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        for path in sorted(plots_dir.iterdir()):
            tracking.log_artifact(path, "evaluation")
    log.info(
        "test accuracy %.4f, macro F1 %.4f, ECE %.4f on %d images",
        metrics["accuracy"],
        metrics["macro_f1"],
        ece,
        len(test.labels),
    )
    return metrics


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "evaluate",
        "Score the trained model on the test split (params: evaluate.*).",
        data=PREPARED,
        model=MODEL,
        run_info=RUN_INFO,
        history=("plots/history.csv", "per-epoch history from train"),
        metrics=("metrics/evaluate.json", "test metrics out"),
        plots=("plots/evaluate", "folder of evaluation tables and pictures out"),
        lock=("dvc.lock", "DVC's lock file, for the training data's hashes (read only)"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "evaluate",
        lambda: run(
            load_params(args.params).evaluate,
            args.data,
            args.model,
            args.run_info,
            args.history,
            args.metrics,
            args.plots,
            args.lock,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
