"""The Keras callbacks every training run uses: tracking, guards, checkpoints, progress."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras

from classifier.cli import raise_if_signalled
from classifier.errors import TrainingDiverged
from classifier.tracking import names, runs
from classifier.training.checkpoint import write_checkpoint


class MlflowEpochLogger(keras.callbacks.Callback):
    """Send each epoch's metrics to MLflow as one batched call, without waiting for a server.

    Keras's ``val_loss`` is logged as ``val/loss``, ``loss`` as ``train/loss``
    (classifier/tracking/names.py), so MLflow's UI charts them in their own sections.

    With a tracking server, MLflow sends them from a background thread while the next
    epoch trains. At most one epoch is in flight: each epoch's end waits for the previous
    one's (long done by then), and ``finish`` for the last, so a server that fails still
    fails the run. An epoch lost to a kill is logged again on resume
    (``runs.log_missing_epochs``). A local store is written at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: Any = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.finish()
        metrics = {names.epoch_metric(key): value for key, value in (logs or {}).items()}
        self.in_flight = runs.log_epoch(metrics, epoch=epoch + 1, wait=False)

    def finish(self) -> None:
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            runs.finish_logging(in_flight)


class LogLearningRate(keras.callbacks.Callback):
    """Add the learning rate at the end of each epoch to the epoch's logs (and to MLflow)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs[names.LEARNING_RATE] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise at the first NaN or infinite loss, so no diverged model is saved.

    Keras calls batch hooks once per ``train.steps_per_execution`` batches; the loss is a
    running mean over the epoch, so a NaN in any batch still shows then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, "
                f"by batch {batch + 1}; "
                "try a lower train.learning_rate in params.yaml"
            )


class StopOnSignal(keras.callbacks.Callback):
    """Stop within ``train.steps_per_execution`` batches if a SIGTERM or Ctrl-C arrived but
    its exception was lost."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        raise_if_signalled()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        raise_if_signalled()


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch, replace the checkpoint with the model, its optimizer and the history."""

    def __init__(self, directory: Path, run_id: str, params: dict[str, Any], rows: list) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.run_id = run_id
        self.run_params = params  # not self.params: Keras sets that to fit's own arguments
        self.rows = rows

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.rows.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        state = {"epoch": epoch + 1, "run_id": self.run_id, "params": self.run_params}
        write_checkpoint(self.directory, self.model, state, self.rows)


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, counting epochs out of the run's total.

    Training calls ``fit`` once per epoch (each on its own shuffle), which would make
    Keras's own bar say ``Epoch 6/6`` for epoch 6 of 15.
    """

    def __init__(self, total_epochs: int) -> None:
        super().__init__()
        self.total_epochs = total_epochs

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params(params)
        self.epochs = self.total_epochs
