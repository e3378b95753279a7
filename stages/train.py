"""Stage ``train``: fit the CNN on the prepared images, tracked as one MLflow run.

Writes the model (``.keras``, raw uint8 pixels in, class probabilities out), the
per-epoch history as CSV (a DVC plot), the last epoch's metrics (a DVC metrics file) and
the MLflow run id that the evaluate and export stages add to.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import pandas as pd

from stages import tracking
from stages.atomic import atomic_path, write_json, write_text
from stages.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from stages.config import Params, load_params
from stages.dataset import CLASSES_FILE, read_splits
from stages.errors import TrainingDiverged
from stages.model import build_model

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


class MlflowEpochLogger(keras.callbacks.Callback):
    """Send each epoch's metrics to MLflow as one batched call."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        tracking.log_epoch(logs or {}, epoch=epoch + 1)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise at the first NaN or infinite batch loss, so no diverged model is saved."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}; "
                "try a lower train.learning_rate in params.yaml"
            )


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    history: pd.DataFrame
    model: keras.Model


def log_data(params: Params, data_dir: Path, splits: dict, data_report: Path | None) -> None:
    """Tie the run to its data: each split as an MLflow dataset input, and the data report."""
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        tracking.log_dataset(
            splits[split].images,
            splits[split].labels,
            name=f"{params.data.source}-{split}",
            source=str((data_dir / split).resolve()),
            context=context,
        )
    tracking.log_artifact(data_dir / CLASSES_FILE, "data")
    if data_report is not None and data_report.is_file():
        tracking.log_artifact(data_report, "data")


def run(
    params: Params,
    data_dir: Path,
    model_path: Path,
    history_path: Path,
    metrics_path: Path,
    run_info_path: Path,
    data_report: Path | None = None,
) -> TrainResult:
    """Train ``params.train.architecture`` on ``data_dir`` and write the four outputs."""
    cfg = params.train
    splits = read_splits(data_dir)
    train, val = splits["train"], splits["val"]
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.architecture, train.image_shape, len(train.class_names))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    with tracking.training_run(params.flat()) as run_id:
        log_data(params, data_dir, splits, data_report)
        fit = model.fit(
            train.images,
            train.labels,
            validation_data=(val.images, val.labels),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            shuffle=True,
            callbacks=[StopOnNonFiniteLoss(), MlflowEpochLogger()],
            verbose=1 if sys.stdout.isatty() else 2,
        )
        history = pd.DataFrame(fit.history)
        history.insert(0, "epoch", range(1, len(history) + 1))
        history = history[HISTORY_COLUMNS]
        last = history.iloc[-1]

        with atomic_path(model_path) as tmp_model:
            model.save(tmp_model)
        write_text(history_path, history.to_csv(index=False))
        write_json(metrics_path, {key: float(last[key]) for key in HISTORY_COLUMNS[1:]})
        write_json(
            run_info_path,
            {
                "run_id": run_id,
                "experiment": tracking.experiment_name(),
                "tracking_uri": tracking.tracking_uri(),
            },
        )
        tracking.log_artifact(history_path)
    log.info(
        "trained %d epochs: val_accuracy %.4f, model at %s",
        len(history),
        last["val_accuracy"],
        model_path,
    )
    return TrainResult(run_id=run_id, history=history, model=model)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "train",
        "Train the CNN (params: train.*) on the prepared splits, tracked in MLflow.",
        data=PREPARED,
        model=(MODEL[0], "model out"),
        history=("plots/history.csv", "per-epoch CSV out"),
        metrics=("metrics/train.json", "final metrics out"),
        run_info=(RUN_INFO[0], "MLflow run id out"),
        data_report=("reports/data.md", "data report to log"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "train",
        lambda: run(
            load_params(args.params),
            args.data,
            args.model,
            args.history,
            args.metrics,
            args.run_info,
            args.data_report,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
