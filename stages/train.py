"""Stage ``train``: fit the CNN on the prepared images, tracked as one MLflow run.

Writes the model (``.keras``, raw uint8 pixels in, class probabilities out), the
per-epoch history as CSV (a DVC plot), the last epoch's metrics (a DVC metrics file) and
the MLflow run id that the evaluate and export stages add to.

Training is a pure function of the params and the data: weights start from
``train.seed`` and each epoch's shuffle is drawn from (seed, epoch), so two runs give the
same weights bit for bit on the same machine (see README, "Reproducible"). After every
epoch the model, its optimizer state and the history so far are checkpointed to
``models/checkpoint/``; an interrupted run (Ctrl-C, SIGTERM, SIGKILL) continues from
there with ``train.resume: true`` and ends where an uninterrupted run would have.

Speed: with ``train.precision: auto`` the model computes in bfloat16 (variables stay
float32) on CPUs with bf16 matrix instructions, read from ``/proc/cpuinfo``. The saved
model is always rebuilt in float32 with the trained weights, so export and serving see a
plain float32 model. ``train.schedule`` and ``train.augment`` are a faster recipe for the
same architecture; both are pure functions of (seed, epoch, step), so resume stays exact.

Several machines: with ``TF_CONFIG`` set, every worker runs this stage and they train one
model under ``tf.distribute.MultiWorkerMirroredStrategy``; only the chief tracks the run
and writes the outputs (see ``stages/distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from stages import distributed, tracking
from stages.atomic import atomic_path, write_json, write_text
from stages.cli import MODEL, PREPARED, RUN_INFO, raise_if_signalled, run_stage, stage_parser
from stages.config import Params, TrainParams, load_params
from stages.dataset import CLASSES_FILE, read_splits
from stages.errors import StageError, TrainingDiverged
from stages.model import build_model, load_model

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
CHECKPOINT = ("models/checkpoint", "last completed epoch: model, optimizer state, history")
CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"
# Params that may differ between an interrupted run and the one that resumes it.
RESUME_FREE_PARAMS = ("train.resume",)
# Run tags of a multi-worker run: its machines, and the model copies trained in step.
TAG_WORKERS = "train.workers"
TAG_REPLICAS = "train.replicas"

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags of CPUs with native bfloat16 matrix products (Intel AMX since
# Sapphire Rapids, AVX512_BF16 since Cooper Lake, AMD Zen 4): there bf16 is about twice as
# fast as float32 at the same accuracy; elsewhere it is emulated and slower.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# warmup_cosine starts at this fraction of train.learning_rate.
WARMUP_START_FRACTION = 0.1
# augment: shift moves each image by up to this fraction of its height and width
# (2 pixels at 28x28), drawn per image and epoch; the border is filled with black.
SHIFT_FRACTION = 2 / 28
# augment: affine also rotates each image by up to this many degrees either way and scales
# it by up to this fraction, about its centre, then shifts it (not by whole pixels) as
# above; bilinear sampling, black border.
AFFINE_MAX_DEGREES = 10.0
AFFINE_MAX_SCALE = 0.1
# Images transformed per block, so the sampling grids stay a few tens of MB.
AFFINE_BLOCK = 2048


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether ``cpuinfo`` (Linux /proc/cpuinfo text) lists a native bfloat16 flag."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    """The Keras dtype policy for ``train.precision``: ``auto`` asks the CPU.

    Without /proc/cpuinfo (macOS, Windows) auto means float32.
    """
    if precision != "auto":
        return precision
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    return MIXED_BFLOAT16 if cpu_has_bf16(cpuinfo) else FLOAT32


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name``, then restore the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


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


def _window(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices that move an axis of ``size`` by ``shift`` pixels."""
    return slice(max(shift, 0), size + min(shift, 0)), slice(max(-shift, 0), size - max(shift, 0))


def shift_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by a random whole number of pixels in each direction, black border."""
    _, height, width, _ = images.shape
    most = [max(1, round(size * SHIFT_FRACTION)) for size in (height, width)]
    shifts = np.stack([rng.integers(-m, m + 1, size=len(images)) for m in most], axis=1)
    shifted = np.zeros_like(images)
    for dy in range(-most[0], most[0] + 1):
        rows_to, rows_from = _window(dy, height)
        for dx in range(-most[1], most[1] + 1):
            chosen = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            cols_to, cols_from = _window(dx, width)
            shifted[chosen, rows_to, cols_to] = images[chosen, rows_from, cols_from]
    return shifted


def affine_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image rotated, scaled and shifted at random about its centre; black border."""
    count, height, width, _ = images.shape
    return warp_images(
        images,
        degrees=rng.uniform(-AFFINE_MAX_DEGREES, AFFINE_MAX_DEGREES, count),
        scales=rng.uniform(1 - AFFINE_MAX_SCALE, 1 + AFFINE_MAX_SCALE, count),
        shifts=rng.uniform(-SHIFT_FRACTION, SHIFT_FRACTION, (count, 2)) * (height, width),
    )


def warp_images(
    images: np.ndarray, degrees: np.ndarray, scales: np.ndarray, shifts: np.ndarray
) -> np.ndarray:
    """Rotate each image clockwise (as displayed) by its degrees, scale it about its centre,
    then shift it by its (down, right) pixels; bilinear sampling, black border.

    Output pixel p samples the input at ``centre + A^-1 (p - centre - shift)`` with
    A = scale * rotation, vectorised over blocks of images.
    """
    count, height, width, _ = images.shape
    angles = np.deg2rad(degrees)
    cos = (np.cos(angles) / scales).astype(np.float32)[:, None, None]
    sin = (np.sin(angles) / scales).astype(np.float32)[:, None, None]
    shifts = np.asarray(shifts, np.float32)[..., None, None]
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32) - centre_y,
        np.arange(width, dtype=np.float32) - centre_x,
        indexing="ij",
    )
    # A one-pixel black frame: every sample point is clipped into it, so no bounds checks.
    framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(images)
    for start in range(0, count, AFFINE_BLOCK):
        block = slice(start, start + AFFINE_BLOCK)
        dy, dx = rows - shifts[block, 0], cols - shifts[block, 1]
        # The inverse rotation divided by the scale, in the framed image's coordinates.
        source_y = cos[block] * dy - sin[block] * dx + (centre_y + 1)
        source_x = sin[block] * dy + cos[block] * dx + (centre_x + 1)
        out[block] = _bilinear(framed[block], source_y, source_x)
    return out


def _bilinear(framed: np.ndarray, source_y: np.ndarray, source_x: np.ndarray) -> np.ndarray:
    """Sample each framed image (black outer pixels) at its points, bilinearly, as uint8."""
    count, height, width, channels = framed.shape
    source_y = np.clip(source_y, 0, height - 1)
    source_x = np.clip(source_x, 0, width - 1)
    top = np.minimum(source_y.astype(np.int32), height - 2)
    left = np.minimum(source_x.astype(np.int32), width - 2)
    weight_y, weight_x = (source_y - top)[..., None], (source_x - left)[..., None]
    corner = (np.arange(count, dtype=np.int32) * (height * width))[:, None, None] + (
        top * width + left
    )
    flat = framed.reshape(-1, channels).astype(np.float32)
    upper = flat[corner] * (1 - weight_x) + flat[corner + 1] * weight_x
    lower = flat[corner + width] * (1 - weight_x) + flat[corner + width + 1] * weight_x
    total = upper * (1 - weight_y) + lower * weight_y
    return np.clip(np.rint(total), 0, 255).astype(framed.dtype)


AUGMENTATIONS = {"shift": shift_images, "affine": affine_images}


def float32_model(
    model: keras.Model, cfg: TrainParams, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """``model`` itself if it computes in float32, else a float32 rebuild with its weights.

    Export converts the saved model to TFLite and ONNX and checks them against Keras to
    1e-5, so the saved model must be plain float32 whatever precision trained it.
    """
    if model.compute_dtype == FLOAT32:
        return model
    with dtype_policy(FLOAT32):
        plain = build_model(cfg.architecture, input_shape, num_classes)
    plain.set_weights(model.get_weights())
    return plain


class MlflowEpochLogger(keras.callbacks.Callback):
    """Send each epoch's metrics to MLflow as one batched call, without waiting for a server.

    With a tracking server, MLflow sends them from a background thread while the next
    epoch trains. At most one epoch is in flight: each epoch's end waits for the previous
    one's (long done by then), and ``finish`` for the last, so a server that fails still
    fails the run. An epoch lost to a kill is logged again on resume
    (``tracking.log_missing_epochs``). A local store is written at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: Any = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.finish()
        self.in_flight = tracking.log_epoch(logs or {}, epoch=epoch + 1, wait=False)

    def finish(self) -> None:
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            tracking.finish_logging(in_flight)


class LogLearningRate(keras.callbacks.Callback):
    """Add the learning rate at the end of each epoch to the epoch's logs (and to MLflow)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(
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
        with atomic_path(self.directory, directory=True) as staged:
            self.model.save(staged / CHECKPOINT_MODEL)
            state = {"epoch": epoch + 1, "run_id": self.run_id, "params": self.run_params}
            write_json(staged / CHECKPOINT_STATE, {**state, "history": self.rows})


@dataclass(frozen=True)
class Checkpoint:
    """Where an interrupted run stopped: its model, epoch, MLflow run and history."""

    model: keras.Model
    epoch: int
    run_id: str
    history: list[dict[str, float]]


def read_checkpoint(directory: Path, params: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint in ``directory`` if there is one; it must come from the same params."""
    state_path = Path(directory) / CHECKPOINT_STATE
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
        saved, epoch, run_id, rows = (
            state["params"],
            int(state["epoch"]),
            str(state["run_id"]),
            list(state["history"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise StageError(f"{state_path}: unreadable checkpoint ({error}); delete it") from None
    changed = [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in params.items()
        if key not in RESUME_FREE_PARAMS and saved.get(key) != value
    ]
    if changed:
        raise StageError(
            f"{directory} was made with other params ({'; '.join(changed)}): set "
            "train.resume: false to start over, or restore those params to resume"
        )
    return Checkpoint(load_model(str(Path(directory) / CHECKPOINT_MODEL)), epoch, run_id, rows)


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffle of one epoch: a pure function of the seed and the epoch number.

    So a resumed run sees the same batches in the same order as an uninterrupted one.
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; a worker other than the chief has no run and no history."""

    run_id: str | None
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


def _scope(strategy: Any) -> Any:
    """``strategy.scope()``, or nothing when training alone."""
    return nullcontext() if strategy is None else strategy.scope()


def _steps_per_execution(cfg: TrainParams, strategy: Any) -> int:
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


def _train_epochs(
    model: keras.Model,
    cfg: TrainParams,
    train: Any,
    val: Any,
    callbacks: Sequence[keras.callbacks.Callback],
    first_epoch: int,
) -> None:
    """Fit epochs ``first_epoch`` to ``cfg.epochs``, each on its (seed, epoch) shuffle."""
    for epoch in range(first_epoch, cfg.epochs):
        order = epoch_order(cfg.seed, epoch, len(train.labels))
        images = train.images[order]
        if cfg.augment != "none":
            augment = AUGMENTATIONS[cfg.augment]
            images = augment(images, np.random.default_rng([cfg.seed, epoch, 1]))
        model.fit(
            images,
            train.labels[order],
            validation_data=(val.images, val.labels),
            initial_epoch=epoch,
            epochs=epoch + 1,
            batch_size=cfg.batch_size,
            shuffle=False,
            callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
        )


def run(
    params: Params,
    data_dir: Path,
    model_path: Path,
    history_path: Path,
    metrics_path: Path,
    run_info_path: Path,
    data_report: Path | None = None,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Train ``params.train.architecture`` on ``data_dir`` and write the four outputs.

    Each epoch is checkpointed to ``checkpoint_dir`` (default: ``checkpoint/`` beside the
    model). With ``train.resume``, continue the run checkpointed there instead of starting
    over (a fresh start if there is no checkpoint). ``callbacks`` run after the stage's own
    at every epoch (benchmarks time epochs with them).
    """
    checkpoint_dir = Path(checkpoint_dir or Path(model_path).parent / "checkpoint")
    cfg = params.train
    flat_params = params.flat()
    cluster = distributed.cluster_from_env()
    if cluster is not None and cfg.resume:
        raise distributed.ClusterConfigError(
            "train.resume: multi-worker training cannot resume; the checkpoint is the chief's "
            "alone (set train.resume: false, or unset TF_CONFIG to resume on one machine)"
        )
    # MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
    strategy = None if cluster is None else distributed.strategy()
    splits = read_splits(data_dir)
    train, val = splits["train"], splits["val"]
    keras.utils.set_random_seed(cfg.seed)
    checkpoint = read_checkpoint(checkpoint_dir, flat_params) if cfg.resume else None
    num_classes = len(train.class_names)
    if checkpoint is None:
        with dtype_policy(resolve_precision(cfg.precision)), _scope(strategy):
            model = build_model(cfg.architecture, train.image_shape, num_classes)
            steps_per_epoch = math.ceil(len(train.labels) / cfg.batch_size)
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=learning_rate(cfg, steps_per_epoch)),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
                steps_per_execution=_steps_per_execution(cfg, strategy),
            )
        if strategy is not None:
            distributed.adapt_to_multi_worker(model, strategy)
            log.info(
                "training as %s %d of %d workers, %d replicas in sync",
                cluster.role,
                cluster.index,
                cluster.workers,
                strategy.num_replicas_in_sync,
            )
        first_epoch, rows = 0, []
    else:
        model, first_epoch, rows = checkpoint.model, checkpoint.epoch, checkpoint.history
        log.info("resuming MLflow run %s after epoch %d", checkpoint.run_id, first_epoch)
    if cluster is not None and not cluster.is_chief:
        guards = [StopOnSignal(), StopOnNonFiniteLoss()]
        distributed.reporting_lost_workers(
            partial(_train_epochs, model, cfg, train, val, guards, 0)
        )
        log.info(
            "trained %d epochs as worker %d; the chief writes the outputs",
            cfg.epochs,
            cluster.index,
        )
        return TrainResult(run_id=None, history=pd.DataFrame(columns=HISTORY_COLUMNS), model=model)
    resumed = None if checkpoint is None else checkpoint.run_id
    with tracking.training_run(flat_params, resume_run_id=resumed) as run_id:
        if checkpoint is None:
            log_data(params, data_dir, splits, data_report)
        else:  # an epoch checkpointed just before the interrupt may not have reached MLflow
            tracking.log_missing_epochs(rows)
        if cluster is not None:
            replicas = str(strategy.num_replicas_in_sync)
            tracking.set_tags({TAG_WORKERS: str(cluster.workers), TAG_REPLICAS: replicas})
        epoch_logger = MlflowEpochLogger()
        stage_callbacks = [
            StopOnSignal(),
            StopOnNonFiniteLoss(),
            LogLearningRate(),
            epoch_logger,
            EpochCheckpoint(checkpoint_dir, run_id, flat_params, rows),
            *callbacks,
        ]
        epochs = partial(_train_epochs, model, cfg, train, val, stage_callbacks, first_epoch)
        if cluster is None:
            epochs()
        else:
            distributed.reporting_lost_workers(epochs)
        epoch_logger.finish()
        history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
        last = history.iloc[-1]
        model = float32_model(model, cfg, train.image_shape, num_classes)

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
        checkpoint=CHECKPOINT,
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
            args.checkpoint,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
