"""The per-epoch checkpoint an interrupted run resumes from.

``models/checkpoint/`` holds the model with its optimizer state and ``state.json``: the
epoch, the MLflow run, the params and the history so far. It is replaced atomically after
every epoch, and a resume must use the same params (``train.resume`` aside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from classifier.atomic import atomic_path, write_json
from classifier.errors import StageError
from classifier.model.files import load_model

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"
# Params that may differ between an interrupted run and the one that resumes it.
RESUME_FREE_PARAMS = ("train.resume",)


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


def write_checkpoint(
    directory: Path, model: keras.Model, state: dict[str, Any], history: list[dict[str, float]]
) -> None:
    """Replace the checkpoint in ``directory`` with ``model`` and its state, atomically."""
    with atomic_path(directory, directory=True) as staged:
        model.save(staged / CHECKPOINT_MODEL)
        write_json(staged / CHECKPOINT_STATE, {**state, "history": history})
