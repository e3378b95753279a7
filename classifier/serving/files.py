"""Classify image files with a trained ``.keras`` model, as ``python -m tools.predict`` does.

Images are decoded, converted and resized exactly as preprocessing did
(classifier/data/images.py, with the ``preprocess.resize`` policy); the size and channels
come from the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from classifier.data.images import UnreadableImage, load_image
from classifier.errors import DataError

BATCH_SIZE = 64


def read_labels(path: Path) -> list[str]:
    """The class names in a labels file (``classes.json``): a JSON list of strings."""
    try:
        class_names = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the labels file: {error}") from None
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise DataError(
            f"{path}: expected a JSON list of class names, got {type(class_names).__name__}"
        )
    return class_names


def image_paths(targets: Sequence[Path]) -> Iterator[Path]:
    """Each file named, and every file in each folder named (sorted, hidden ones skipped)."""
    for target in targets:
        if target.is_dir():
            yield from sorted(
                p
                for p in target.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(target).parts)
            )
        elif target.is_file():
            yield target
        else:
            raise DataError(f"{target}: no such file or folder")


def predict(
    targets: Sequence[Path], model_path: Path, class_names: Sequence[str], resize: str
) -> tuple[list[tuple[Path, str, float]], list[tuple[Path, str]]]:
    """(path, class, confidence) for each usable image, and (path, reason) for the rest."""
    from tqdm import tqdm

    from classifier.model.files import load_model

    model = load_model(str(model_path))
    height, width, channels = model.input_shape[1:]
    if model.output_shape[-1] != len(class_names):
        raise DataError(
            f"the model predicts {model.output_shape[-1]} classes but the labels file names "
            f"{len(class_names)}"
        )
    paths = list(image_paths(targets))
    predictions, failures = [], []
    batch, batch_paths = [], []

    def flush() -> None:
        probabilities = model.predict(np.stack(batch), verbose=0)
        for path, row in zip(batch_paths, probabilities, strict=True):
            predictions.append((path, class_names[int(row.argmax())], float(row.max())))
        batch.clear()
        batch_paths.clear()

    for path in tqdm(paths, desc="predicting", unit="image", disable=not sys.stderr.isatty()):
        try:
            pixels, _ = load_image(path, height, width, channels, resize)
        except UnreadableImage as error:
            failures.append((path, str(error)))
            continue
        batch.append(pixels)
        batch_paths.append(path)
        if len(batch) == BATCH_SIZE:
            flush()
    if batch:
        flush()
    return predictions, failures
