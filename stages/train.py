"""Stage ``train``: fit the CNN on the prepared images, tracked as one MLflow run.

Writes the model (``.keras``, raw uint8 pixels in, class probabilities out), the
per-epoch history as CSV (a DVC plot), the last epoch's metrics (a DVC metrics file) and
the MLflow run id that the evaluate and export stages add to. The loop, resume and
multi-worker training: classifier/training/loop.py.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from classifier.atomic import atomic_path, check_writable, write_json, write_text
from classifier.cli import MODEL, PREPARED, RUN_INFO, exit_process, run_stage, stage_parser
from classifier.config import Params, load_params
from classifier.tracking import description, names, runs, store
from classifier.training import trial
from classifier.training.loop import HISTORY_COLUMNS, Trainer, TrainResult

log = logging.getLogger(__name__)

CHECKPOINT = ("models/checkpoint", "last completed epoch: model, optimizer state, history")


@dataclass(frozen=True)
class TrainOutputs:
    """Where the stage writes: the model, history, metrics, run id and checkpoint."""

    model: Path
    history: Path
    metrics: Path
    run_info: Path
    checkpoint: Path

    @classmethod
    def under(cls, folder: Path) -> TrainOutputs:
        """Every output in ``folder``, named as dvc.yaml names them (for tests and tools)."""
        folder = Path(folder)
        return cls(
            model=folder / "model.keras",
            history=folder / "history.csv",
            metrics=folder / "train.json",
            run_info=folder / "train_run.json",
            checkpoint=folder / "checkpoint",
        )

    def check_writable(self) -> None:
        """Raise OSError, before any training, for an output that could not be written."""
        for path in (self.model, self.history, self.metrics, self.run_info):
            check_writable(path)
        check_writable(self.checkpoint.parent / f".{self.checkpoint.name}.probe")


def write_outputs(result: TrainResult, outputs: TrainOutputs) -> None:
    """The model, history, last epoch's metrics and the run's id, each written atomically."""
    with atomic_path(outputs.model) as staged_model:
        result.model.save(staged_model)
    write_text(outputs.history, result.history.to_csv(index=False))
    last = result.history.iloc[-1]
    metrics = {key: float(last[key]) for key in HISTORY_COLUMNS[1:]}
    write_json(outputs.metrics, {**metrics, "temperature": result.temperature})
    write_json(
        outputs.run_info,
        {
            "run_id": result.run_id,
            "experiment": store.experiment_name(),
            "tracking_uri": store.tracking_uri(),
        },
    )


def run(
    params: Params,
    *,
    data_dir: Path,
    outputs: TrainOutputs,
    data_report: Path | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Train ``params.train.architecture`` on ``data_dir`` and write ``outputs``.

    With ``train.resume``, continue the run checkpointed in ``outputs.checkpoint`` instead
    of starting over. ``callbacks`` run after the stage's own at every epoch.
    """
    outputs.check_writable()
    sweep = trial.join_sweep()  # a sweep's trial: its threads, its GPU, its parent run
    trainer = Trainer.start(params, Path(data_dir), outputs.checkpoint)
    if not trainer.is_chief:
        return trainer.fit_as_worker()
    with runs.training_run(
        params.flat(),
        resume_run_id=trainer.resumed_run_id,
        parent_run_id=None if sweep is None else sweep.parent_run_id,
    ) as run_id:
        trainer.log_inputs(data_report)
        result = trainer.fit(run_id, callbacks)
        write_outputs(result, outputs)
        runs.log_artifact(outputs.history)
        runs.log_metrics({names.TEMPERATURE: result.temperature})
        val_accuracy = float(result.history.iloc[-1]["val_accuracy"])
        runs.describe_run(run_id, description.trained(len(result.history), val_accuracy))
    log.info(
        "trained %d epochs: val_accuracy %.4f, model at %s",
        len(result.history),
        val_accuracy,
        outputs.model,
    )
    return result


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
        checkpoint=CHECKPOINT,
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outputs = TrainOutputs(
        model=args.model,
        history=args.history,
        metrics=args.metrics,
        run_info=args.run_info,
        checkpoint=args.checkpoint,
    )
    return run_stage(
        "train",
        lambda: run(
            load_params(args.params),
            data_dir=args.data,
            outputs=outputs,
            data_report=args.data_report,
        ),
        params=args.params,
    )


if __name__ == "__main__":
    exit_process(main())
