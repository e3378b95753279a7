"""The names of what runs log to MLflow, grouped for its UI.

MLflow's chart view groups metrics into sections by the prefix before the first ``/``, so
every metric carries one: ``train/`` and ``val/`` for the learning curves, ``test/`` for
what decides (the held-out test split), ``format/<format>/`` for each exported format's
parity, ``serving/`` for what the served model abstains on. No view then presents
training accuracy as the model's quality: it sits under ``train/``, apart from ``test/``.

Keras names the epoch's logs ``loss``, ``accuracy``, ``val_loss``...; ``epoch_metric``
maps them, and ``keras_name`` maps back (resuming a run reads its logged history).
"""

from __future__ import annotations

TRAIN = "train/"
VAL = "val/"
TEST = "test/"
FORMAT = "format/"
SERVING = "serving/"

KERAS_VAL_PREFIX = "val_"
# Logged per epoch under train/ although Keras does not compute it on the training batches.
LEARNING_RATE = "learning_rate"

# What decides, and what a person compares runs by (docs/experiments.md).
TEST_ACCURACY = TEST + "accuracy"
TEST_MACRO_F1 = TEST + "macro_f1"
VAL_LOSS = VAL + "loss"
TRAIN_LOSS = TRAIN + "loss"


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
