"""The training loop: build (or resume) the model, fit it epoch by epoch, tracked in MLflow.

Training is a pure function of the params and the data: weights start from
``train.seed`` and each epoch's shuffle is drawn from (seed, epoch), so two runs give the
same weights bit for bit on the same machine (docs/reproducibility.md). After every
epoch the model, its optimizer state and the history so far are checkpointed; an
interrupted run (Ctrl-C, SIGTERM, SIGKILL) continues from there with
``train.resume: true`` and ends where an uninterrupted run would have.

Several machines: with ``TF_CONFIG`` set, every worker runs the same loop and they train
one model under ``tf.distribute.MultiWorkerMirroredStrategy``; only the chief tracks the
run and writes the outputs (see classifier/training/distributed.py).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from classifier.config import Params, TrainParams
from classifier.data.dataset import CLASSES_FILE, ImageSet, read_splits
from classifier.model.architectures import build_model
from classifier.model.tta import with_flip_average
from classifier.tracking import runs
from classifier.training import batch_norm, distributed, transfer
from classifier.training.augment import augment_epoch
from classifier.training.calibration import calibrate
from classifier.training.callbacks import (
    EpochCheckpoint,
    EpochProgress,
    LogLearningRate,
    MlflowEpochLogger,
    StopOnNonFiniteLoss,
    StopOnSignal,
)
from classifier.training.checkpoint import Checkpoint, read_checkpoint
from classifier.training.losses import training_loss
from classifier.training.precision import dtype_policy, float32_model, resolve_precision

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
# Run tags of a multi-worker run: its machines, and the model copies trained in step.
TAG_WORKERS = "train.workers"
TAG_REPLICAS = "train.replicas"
# warmup_cosine starts at this fraction of train.learning_rate.
WARMUP_START_FRACTION = 0.1


def learning_rate(cfg: TrainParams, steps_per_epoch: int) -> float | Any:
    """The learning rate, or a schedule of the optimizer's step, for ``train.schedule``."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * WARMUP_START_FRACTION,
        decay_steps=total_steps - warmup_steps,
        alpha=0.0,
        warmup_target=cfg.learning_rate,
        warmup_steps=warmup_steps,
    )


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffle of one epoch: a pure function of the seed and the epoch number.

    So a resumed run sees the same batches in the same order as an uninterrupted one.
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


def steps_per_execution(cfg: TrainParams, strategy: Any) -> int:
    """``train.steps_per_execution``, or 1 under a multi-worker strategy.

    Keras 3's multi-step loop breaks in a replica context (keras-team/keras#19246:
    "You must feed a value for placeholder tensor"), so a cluster runs one step per call.
    """
    if strategy is None or cfg.steps_per_execution == 1:
        return cfg.steps_per_execution
    log.info(
        "train.steps_per_execution %d -> 1: multi-worker training runs one step per call "
        "(keras-team/keras#19246)",
        cfg.steps_per_execution,
    )
    return 1


def optimizer(
    cfg: TrainParams, steps_per_epoch: int, rate: float | None = None
) -> keras.optimizers.Optimizer:
    """Adam, or AdamW with ``train.weight_decay`` (decoupled from the gradient) when it is set.

    The rate is ``train.learning_rate`` on its schedule, unless ``rate`` is given.
    """
    rate = learning_rate(cfg, steps_per_epoch) if rate is None else rate
    if cfg.weight_decay == 0:
        return keras.optimizers.Adam(learning_rate=rate)
    return keras.optimizers.AdamW(learning_rate=rate, weight_decay=cfg.weight_decay)


def new_model(cfg: TrainParams, train: ImageSet, strategy: Any) -> keras.Model:
    """The compiled model of ``train.architecture`` for ``train``, at ``train.precision``."""
    scope = nullcontext() if strategy is None else strategy.scope()
    with dtype_policy(resolve_precision(cfg.precision)), scope:
        model = build_model(cfg.architecture, train.image_shape, len(train.class_names))
        if transfer.is_backbone(cfg):
            transfer.load_pretrained(model, cfg)
            transfer.freeze_backbone(model)
        steps_per_epoch = math.ceil(len(train.labels) / cfg.batch_size)
        compile_model(model, cfg, optimizer(cfg, steps_per_epoch), strategy)
    return model


def compile_model(
    model: keras.Model, cfg: TrainParams, optimizer: keras.optimizers.Optimizer, strategy: Any
) -> None:
    model.compile(
        optimizer=optimizer,
        loss=training_loss(cfg.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution(cfg, strategy),
    )


def fit_epochs(
    model: keras.Model,
    cfg: TrainParams,
    train: ImageSet,
    val: ImageSet,
    callbacks: Sequence[keras.callbacks.Callback],
    first_epoch: int,
    last_epoch: int | None = None,
) -> None:
    """Fit epochs ``first_epoch`` up to ``last_epoch`` (default ``cfg.epochs``), each on its
    (seed, epoch) shuffle."""
    for epoch in range(first_epoch, cfg.epochs if last_epoch is None else last_epoch):
        order = epoch_order(cfg.seed, epoch, len(train.labels))
        model.fit(
            augment_epoch(train.images[order], cfg.augment, cfg.seed, epoch),
            train.labels[order],
            validation_data=(val.images, val.labels),
            initial_epoch=epoch,
            epochs=epoch + 1,
            batch_size=cfg.batch_size,
            shuffle=False,
            callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
        )


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; a worker other than the chief has no run and no history.

    ``model`` is the float32 model that is saved, with its ``temperature`` built in when
    ``train.calibrate`` (1.0 otherwise).
    """

    run_id: str | None
    history: pd.DataFrame
    model: keras.Model
    temperature: float = 1.0


@dataclass
class Trainer:
    """One training run: its data, its model (new or resumed) and its place in a cluster.

    :meth:`start` reads the data and builds or resumes the model; the chief then opens the
    MLflow run and calls :meth:`fit` inside it, while other workers call
    :meth:`fit_as_worker`.
    """

    params: Params
    data_dir: Path
    splits: dict[str, ImageSet]
    model: keras.Model
    checkpoint_dir: Path
    checkpoint: Checkpoint | None = None
    cluster: distributed.Cluster | None = None
    strategy: Any = None
    rows: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, params: Params, data_dir: Path, checkpoint_dir: Path) -> Trainer:
        """Read the splits, seed everything, and build the model or resume the checkpoint."""
        cfg = params.train
        cluster = distributed.cluster_from_env()
        if cluster is not None and cfg.resume:
            raise distributed.ClusterConfigError(
                "train.resume: multi-worker training cannot resume; the checkpoint is the "
                "chief's alone (set train.resume: false, or unset TF_CONFIG to resume on one "
                "machine)"
            )
        # MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
        strategy = None if cluster is None else distributed.strategy()
        splits = read_splits(data_dir)
        keras.utils.set_random_seed(cfg.seed)
        checkpoint = read_checkpoint(checkpoint_dir, params.flat()) if cfg.resume else None
        if checkpoint is not None:
            log.info("resuming MLflow run %s after epoch %d", checkpoint.run_id, checkpoint.epoch)
            return cls(
                params, data_dir, splits, checkpoint.model, checkpoint_dir, checkpoint,
                rows=checkpoint.history,
            )  # fmt: skip
        model = new_model(cfg, splits["train"], strategy)
        if strategy is not None:
            distributed.adapt_to_multi_worker(model, strategy)
            log.info(
                "training as %s %d of %d workers, %d replicas in sync",
                cluster.role,
                cluster.index,
                cluster.workers,
                strategy.num_replicas_in_sync,
            )
        return cls(params, data_dir, splits, model, checkpoint_dir, None, cluster, strategy)

    @property
    def is_chief(self) -> bool:
        """Whether this process tracks the run and writes the outputs (alone, it does)."""
        return self.cluster is None or self.cluster.is_chief

    @property
    def resumed_run_id(self) -> str | None:
        """The MLflow run this resumes, or None for a new one."""
        return None if self.checkpoint is None else self.checkpoint.run_id

    @property
    def first_epoch(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.epoch

    def _fit(self, callbacks: Sequence[keras.callbacks.Callback]) -> None:
        """Phase 1 (every model), then phase 2 (a backbone that fine-tunes)."""
        cfg = self.params.train
        train, val = self.splits["train"], self.splits["val"]
        phases = [(self.first_epoch, cfg.epochs)]
        if transfer.fine_tunes(cfg):
            phases.append((max(self.first_epoch, cfg.epochs), transfer.total_epochs(cfg)))
        for number, (first, last) in enumerate(phases, start=1):
            if number == 2 and self.first_epoch <= cfg.epochs:
                self._start_fine_tuning()
            fit = partial(fit_epochs, self.model, cfg, train, val, callbacks, first, last)
            if self.cluster is None:
                fit()
            else:
                distributed.reporting_lost_workers(fit)

    def _start_fine_tuning(self) -> None:
        """Unfreeze the backbone's top layers; recompile at the fine-tuning rate."""
        cfg = self.params.train
        unfrozen = transfer.unfreeze_top(self.model, cfg.fine_tune_layers)
        steps_per_epoch = math.ceil(len(self.splits["train"].labels) / cfg.batch_size)
        rate = optimizer(cfg, steps_per_epoch, cfg.fine_tune_learning_rate)
        scope = nullcontext() if self.strategy is None else self.strategy.scope()
        with scope:
            compile_model(self.model, cfg, rate, self.strategy)
        log.info("fine-tuning %d backbone layers at %g", len(unfrozen), cfg.fine_tune_learning_rate)

    def fit_as_worker(self) -> TrainResult:
        """Train in step with the chief, which alone tracks and writes."""
        self._fit([StopOnSignal(), StopOnNonFiniteLoss()])
        log.info(
            "trained %d epochs as worker %d; the chief writes the outputs",
            self.params.train.epochs,
            self.cluster.index,
        )
        return TrainResult(None, pd.DataFrame(columns=HISTORY_COLUMNS), self.model)

    def log_inputs(self, data_report: Path | None) -> None:
        """Tie the open run to its data, or to the epochs an interrupt kept from it."""
        if self.checkpoint is not None:
            # An epoch checkpointed just before the interrupt may not have reached MLflow.
            runs.log_missing_epochs(self.rows)
            return
        for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
            runs.log_dataset(
                self.splits[split].images,
                self.splits[split].labels,
                name=f"{self.params.data.source}-{split}",
                source=str((self.data_dir / split).resolve()),
                context=context,
            )
        runs.log_artifact(self.data_dir / CLASSES_FILE, "data")
        if data_report is not None and data_report.is_file():
            runs.log_artifact(data_report, "data")
        pretrained = (
            transfer.weights_file(self.params.train)
            if transfer.is_backbone(self.params.train)
            else None
        )
        if pretrained is not None:
            runs.set_tags({"train.pretrained.sha256": transfer.sha256_of(pretrained)})
        if self.cluster is not None:
            replicas = str(self.strategy.num_replicas_in_sync)
            runs.set_tags({TAG_WORKERS: str(self.cluster.workers), TAG_REPLICAS: replicas})

    def fit(self, run_id: str, callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
        """Train the remaining epochs inside the open run ``run_id``; return the float32 model.

        ``callbacks`` run after the stage's own at every epoch (benchmarks time epochs).
        """
        cfg = self.params.train
        epoch_logger = MlflowEpochLogger()
        self._fit(
            [
                StopOnSignal(),
                StopOnNonFiniteLoss(),
                LogLearningRate(),
                epoch_logger,
                EpochCheckpoint(self.checkpoint_dir, run_id, self.params.flat(), self.rows),
                *callbacks,
                EpochProgress(transfer.total_epochs(cfg)),
            ]
        )
        epoch_logger.finish()
        train = self.splits["train"]
        model = float32_model(self.model, cfg, train.image_shape, len(train.class_names))
        # Exact statistics for the weights that are saved, whatever the number of steps.
        batch_norm.recompute_statistics(model, train.images)
        if cfg.tta == "hflip":
            model = with_flip_average(model)  # before the temperature: fitted on both views
        temperature = 1.0
        if cfg.calibrate:
            model, temperature = calibrate(model, self.splits["val"])
            log.info("calibrated: temperature %.4f, fitted on the validation split", temperature)
        history = pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)
        return TrainResult(run_id, history, model, temperature)
