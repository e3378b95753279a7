"""Stage ``evaluate``: score the trained model on the held-out test split, in depth.

Writes the headline metrics (a DVC metrics file, see classifier/evaluation/metrics.py)
and a plots folder: the tables behind them (every test prediction, confusion counts for
every class pair, per-class metrics, calibration bins) and the pictures: confusion matrix,
reliability diagram, training curves and the most confidently misclassified images; and in
insight/, what the network looks at (classifier/evaluation/insight.py): Grad-CAM heatmaps,
feature maps and the first layer's filters. Everything also goes to the training run in
MLflow.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from classifier.atomic import atomic_path, write_json
from classifier.cli import MODEL, PREPARED, RUN_INFO, exit_process, run_stage, stage_parser
from classifier.config import EvaluateParams, load_params
from classifier.data.dataset import ImageSet, read_image_set
from classifier.evaluation import insight, plots
from classifier.evaluation.metrics import (
    MISCLASSIFIED_SHOWN,
    calibration_bins,
    confusion_counts,
    headline_metrics,
    most_confident_mistakes,
    per_class_table,
    prediction_rows,
)
from classifier.model.files import load_model
from classifier.model.predict import predict
from classifier.model.temperature import logits_of, temperature_of
from classifier.tracking import description, lineage, names, runs

log = logging.getLogger(__name__)


def calibration_figures(model: keras.Model, test: ImageSet) -> dict[str, float]:
    """The temperature built into the model, and the test ECE it would have without it."""
    temperature = temperature_of(model)
    logits = logits_of(model, test.images)
    uncalibrated = np.exp(logits - logits.max(axis=1, keepdims=True))
    uncalibrated /= uncalibrated.sum(axis=1, keepdims=True)
    return {
        "temperature": temperature,
        "ece_uncalibrated": calibration_bins(uncalibrated, test.labels)[0],
    }


def evaluation_figures(
    model, test: ImageSet, probabilities: np.ndarray, counts: pd.DataFrame, calibration: tuple
) -> dict[str, object]:
    """The pictures of the test split: confusion, reliability, mistakes, and what the network
    looks at (Grad-CAM, feature maps, filters, in insight/)."""
    mistakes, captions = most_confident_mistakes(test, probabilities, MISCLASSIFIED_SHOWN)
    return {
        "confusion.png": plots.confusion_figure(counts, test.class_names),
        "reliability.png": plots.reliability_figure(*calibration),
        "misclassified.png": plots.image_grid_figure(
            mistakes, captions, "Most confidently misclassified test images"
        ),
        **insight.insight_figures(model, test, probabilities),
    }


def run(
    cfg: EvaluateParams,
    *,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    history_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    lock_path: Path = Path("dvc.lock"),
) -> dict[str, float]:
    """Score ``model_path`` on the test split; write metrics and the plots folder.

    The training run also gets the code and data versions ``lock_path`` records for train.
    """
    run_id = lineage.read_run_id(run_info_path)
    test = read_image_set(Path(data_dir) / "test")
    model = load_model(str(model_path))
    probabilities = predict(model, test.images, cfg.batch_size)
    predicted = probabilities.argmax(axis=1)
    per_class = per_class_table(test.labels, predicted, test.class_names)
    ece, calibration = calibration_bins(probabilities, test.labels)
    metrics = headline_metrics(probabilities, test.labels, per_class, ece)
    metrics.update(calibration_figures(model, test))
    counts = confusion_counts(test, predicted)
    figures = evaluation_figures(model, test, probabilities, counts, (calibration, ece))
    figures["curves.png"] = plots.curves_figure(pd.read_csv(history_path))

    training = runs.finished_run(run_id)
    with training.stage("evaluate"):
        # The training run's code and data versions, as DVC recorded them once train ended.
        training.record_lineage(lock_path, ["train"], model_path)
        with atomic_path(plots_dir, directory=True) as tmp:
            counts.to_csv(tmp / "confusion.csv", index=False)
            prediction_rows(test, predicted).to_csv(tmp / "predictions.csv", index=False)
            per_class.to_csv(tmp / "per_class.csv", index=False, float_format="%.6f")
            calibration.to_csv(tmp / "calibration.csv", index=False, float_format="%.6f")
            for name, figure in figures.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                plots.save(figure, tmp / name)
        write_json(metrics_path, metrics)
        training.log_metrics({names.test_metric(key): value for key, value in metrics.items()})
        training.log_artifacts(plots_dir, "evaluation")
        right = int(np.sum(predicted == test.labels))
        training.describe(description.evaluated(right, len(test.labels)))
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
            data_dir=args.data,
            model_path=args.model,
            run_info_path=args.run_info,
            history_path=args.history,
            metrics_path=args.metrics,
            plots_dir=args.plots,
            lock_path=args.lock,
        ),
        params=args.params,
    )


if __name__ == "__main__":
    exit_process(main())
