"""Stage ``evaluate``: score the trained model on the held-out test split.

Writes test loss and accuracy (a DVC metrics file) and one row per test image of actual
and predicted class (a DVC confusion-matrix plot), and logs both, with a confusion
matrix picture, to the training run in MLflow.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages import tracking
from stages.atomic import write_json, write_text
from stages.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from stages.config import EvaluateParams, load_params
from stages.dataset import ImageSet, read_image_set

log = logging.getLogger(__name__)

# Keras clips probabilities by this before taking the log in its cross-entropy.
PROBABILITY_EPSILON = 1e-7


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy loss and accuracy of predicted class probabilities."""
    picked = probabilities[np.arange(len(labels)), labels]
    loss = -np.mean(np.log(np.clip(picked, PROBABILITY_EPSILON, 1.0)))
    accuracy = np.mean(probabilities.argmax(axis=1) == labels)
    return {"loss": float(loss), "accuracy": float(accuracy)}


def confusion_rows(test: ImageSet, predicted: np.ndarray) -> pd.DataFrame:
    """One row per test image: its actual and predicted class name (DVC's confusion input)."""
    names = np.asarray(test.class_names)
    return pd.DataFrame({"actual": names[test.labels], "predicted": names[predicted]})


def plot_confusion(rows: pd.DataFrame, class_names: Sequence[str]):
    """A confusion-matrix heat map with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = pd.crosstab(rows["actual"], rows["predicted"]).reindex(
        index=class_names, columns=class_names, fill_value=0
    )
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix.to_numpy(), cmap="Blues")
    axes.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test)",
    )
    threshold = matrix.to_numpy().max() / 2
    for row, actual in enumerate(class_names):
        for column, predicted in enumerate(class_names):
            count = matrix.loc[actual, predicted]
            if count:
                axes.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if count > threshold else "black",
                )
    figure.tight_layout()
    return figure


def run(
    cfg: EvaluateParams,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    metrics_path: Path,
    confusion_path: Path,
) -> dict[str, float]:
    """Score ``model_path`` on the test split and write metrics and confusion rows."""
    from stages.model import load_model

    run_id = tracking.read_run_id(run_info_path)
    test = read_image_set(Path(data_dir) / "test")
    model = load_model(str(model_path))
    probabilities = model.predict(test.images, batch_size=cfg.batch_size, verbose=0)
    metrics = score(probabilities, test.labels)
    rows = confusion_rows(test, probabilities.argmax(axis=1))

    with tracking.resumed_run(run_id):
        write_json(metrics_path, metrics)
        write_text(confusion_path, rows.to_csv(index=False))
        tracking.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        tracking.log_artifact(confusion_path)
        tracking.log_figure(plot_confusion(rows, test.class_names), "confusion_matrix.png")
    log.info(
        "test accuracy %.4f, loss %.4f on %d images",
        metrics["accuracy"],
        metrics["loss"],
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
        metrics=("metrics/evaluate.json", "test metrics out"),
        confusion=("plots/confusion.csv", "confusion rows out"),
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
            args.metrics,
            args.confusion,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
