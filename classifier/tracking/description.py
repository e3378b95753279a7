"""A run's description (MLflow's ``mlflow.note.content``): what the run is, and how it ended.

Two lines, which the MLflow UI shows at the top of the run's page. The first is written
when training starts and stays: architecture, data source, epochs and experiment. The
second is replaced as the pipeline goes on: training, trained (validation accuracy),
the test accuracy with its 95 % interval (evaluate), the version registered and its
alias (export), or the stage that failed and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from classifier.stats import proportion_interval

TAG_NOTE = "mlflow.note.content"
# Markdown: a blank line makes two paragraphs of the UI's two lines.
SEPARATOR = "\n\n"
MAX_ERROR_CHARS = 300
TRAINING = "Training: not finished yet."


def what(params: Mapping[str, Any], experiment: str, dvc_experiment: str | None) -> str:
    """The first line: ``reference_cnn on digits images, 3 epochs; DVC experiment ...``."""
    epochs = int(params.get("train.epochs", 0) or 0)
    epochs += int(params.get("train.fine_tune_epochs", 0) or 0)
    where = f"MLflow experiment `{experiment}`"
    if dvc_experiment:
        where = f"DVC experiment `{dvc_experiment}`, {where}"
    return (
        f"**{params.get('train.architecture', 'model')}** on "
        f"`{params.get('data.source', '?')}` images, {epochs} epochs; {where}."
    )


def note(first_line: str, outcome: str) -> str:
    """The description: what the run is, then how it ended."""
    return f"{first_line}{SEPARATOR}{outcome}"


def first_line(description: str | None) -> str:
    """What the run is, from its description (empty for a run without one)."""
    return (description or "").partition(SEPARATOR)[0]


def trained(epochs: int, val_accuracy: float) -> str:
    """The second line once training ended."""
    return (
        f"Trained {epochs} epochs: validation accuracy {_percent(val_accuracy)} at the last "
        "epoch; not yet scored on the test split."
    )


def tested(right: int, total: int) -> str:
    """The test accuracy with its exact 95 % interval: what decides."""
    low, high = proportion_interval(right, total)
    return (
        f"Test accuracy {_percent(right / total)} (95 % CI {_percent(low)} to "
        f"{_percent(high)}) on {total} test images"
    )


def evaluated(right: int, total: int) -> str:
    """The second line once evaluate ended."""
    return f"{tested(right, total)}; not registered yet."


def registered(right: int, total: int, model_name: str, version: int, alias: str | None) -> str:
    """The second line once export registered the model."""
    aliased = f", @{alias}" if alias else ", without an alias"
    return f"{tested(right, total)}; registered as `{model_name}` version {version}{aliased}."


def failed(stage: str, error: BaseException) -> str:
    """The second line when ``stage`` failed (or was interrupted)."""
    if isinstance(error, KeyboardInterrupt):
        return f"KILLED in {stage}: interrupted."
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    if len(reason) > MAX_ERROR_CHARS:
        reason = reason[: MAX_ERROR_CHARS - 3] + "..."
    return f"FAILED in {stage}: {reason}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"
