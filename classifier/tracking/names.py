"""The names of what runs log to MLflow, grouped for its UI.

MLflow's chart view groups metrics into sections by the prefix before the first ``/``, so
every metric carries one: ``train/`` and ``val/`` for the learning curves, ``test/`` for
what decides (the held-out test split), ``format/<format>/`` for each exported format's
parity, ``serving/`` for what the served model abstains on, ``sweep/`` for a sweep's best
trial and ``monitor/`` for a monitoring run. No
view then presents training accuracy as the model's quality: it sits under ``train/``,
apart from ``test/``.

Keras names the epoch's logs ``loss``, ``accuracy``, ``val_loss``...; ``epoch_metric``
maps them, and ``keras_name`` maps back (resuming a run reads its logged history).

Runs logged before these names (``val_accuracy``, ``test_accuracy``, ``format.onnx.size_bytes``,
``serving.test.abstain_rate``, ``temperature``) are read through ``current``, which gives
their metrics the names of today: code that reads an old run (a champion's, a resumed
one's, a model card's) sees one scheme.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

TRAIN = "train/"
VAL = "val/"
TEST = "test/"
FORMAT = "format/"
SERVING = "serving/"
SWEEP = "sweep/"
MONITOR = "monitor/"

KERAS_VAL_PREFIX = "val_"
# Logged per epoch under train/ although Keras does not compute it on the training batches.
LEARNING_RATE = "learning_rate"

# What decides, and what a person compares runs by (docs/experiments.md).
TEST_ACCURACY = TEST + "accuracy"
TEST_MACRO_F1 = TEST + "macro_f1"
VAL_LOSS = VAL + "loss"
TRAIN_LOSS = TRAIN + "loss"
VAL_ACCURACY = VAL + "accuracy"
# The softmax temperature training fitted on the validation split (training/calibration.py);
# under val/, as a section of its own would open the UI's charts (sorted by name) on it.
TEMPERATURE = VAL + "temperature"

# The names runs had before this scheme, for ``current``.
LEGACY_TEST = "test_"
LEGACY_FORMAT = "format."
LEGACY_SERVING = "serving."
LEGACY_EPOCH = ("loss", "accuracy", LEARNING_RATE)
LEGACY_TEMPERATURE = "temperature"


def epoch_metric(keras_name: str) -> str:
    """The MLflow name of one of Keras's epoch logs: ``val_loss`` -> ``val/loss``."""
    if keras_name.startswith(KERAS_VAL_PREFIX):
        return VAL + keras_name.removeprefix(KERAS_VAL_PREFIX)
    return TRAIN + keras_name


def keras_name(metric: str) -> str:
    """Keras's name of an epoch metric logged as ``epoch_metric`` names it."""
    if metric.startswith(VAL):
        return KERAS_VAL_PREFIX + metric.removeprefix(VAL)
    return metric.removeprefix(TRAIN)


def test_metric(key: str) -> str:
    """The MLflow name of a test-split metric: ``accuracy`` -> ``test/accuracy``."""
    return TEST + key


def format_metric(format_name: str, key: str) -> str:
    """The MLflow name of an exported format's figure: ``format/onnx/max_abs_diff``."""
    return f"{FORMAT}{format_name}/{key}"


def serving_metric(*keys: str) -> str:
    """The MLflow name of a serving figure: ``serving/validation/abstain_rate``."""
    return SERVING + "/".join(keys)


def sweep_metric(metric_file: str, key: str) -> str:
    """The sweep's best value of ``key`` in ``metric_file``: ``sweep/best/evaluate/accuracy``.

    The file's stem stays in the name: ``accuracy`` of metrics/train.json is training
    accuracy, that of metrics/evaluate.json is test accuracy.
    """
    return f"{SWEEP}best/{PurePosixPath(metric_file).stem}/{key}"


def monitor_metric(*keys: str) -> str:
    """The MLflow name of a monitoring run's figure: ``monitor/class_mix/p_value``."""
    return MONITOR + "/".join(keys)


def current_name(metric: str) -> str:
    """The name ``metric`` has in this scheme, for one a run logged before it (else itself)."""
    if "/" in metric:
        return metric
    if metric in LEGACY_EPOCH or metric.startswith(KERAS_VAL_PREFIX):
        return epoch_metric(metric)
    if metric.startswith(LEGACY_TEST):
        return test_metric(metric.removeprefix(LEGACY_TEST))
    if metric == LEGACY_TEMPERATURE:
        return TEMPERATURE
    for legacy, prefix in ((LEGACY_FORMAT, FORMAT), (LEGACY_SERVING, SERVING)):
        if metric.startswith(legacy):
            return prefix + metric.removeprefix(legacy).replace(".", "/")
    return metric


def current(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics under today's names; where a run has both, the new name's value wins."""
    renamed = {current_name(name): value for name, value in metrics.items() if "/" not in name}
    return {**renamed, **{name: value for name, value in metrics.items() if "/" in name}}


def section(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The metrics of one section (``names.TEST``...) of a run's ``metrics``, old names or new."""
    return {name: value for name, value in current(metrics).items() if name.startswith(prefix)}
