"""Predict the class of image files with the trained model.

    python -m stages.predict photo.jpg scans/ ...

Prints one line per image: its path, the predicted class and the confidence. Images are
decoded, converted and resized exactly as preprocessing did (stages/images.py, with
``preprocess.resize`` from params.yaml); the size and channels come from the model.
Files that are not usable images get one line each on stderr, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from stages.cli import MODEL, PREPARED, run_stage
from stages.config import load_params
from stages.errors import DataError
from stages.images import UnreadableImage, load_image

log = logging.getLogger(__name__)

BATCH_SIZE = 64


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

    from stages.model import load_model

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.predict",
        description="Print the predicted class and confidence of image files or folders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of them")
    parser.add_argument("--model", type=Path, default=Path(MODEL[0]), help=MODEL[1])
    parser.add_argument(
        "--labels",
        type=Path,
        default=Path(PREPARED[0]) / "classes.json",
        help="class names, in the model's output order",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for the resize policy)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []

    def body() -> None:
        try:
            class_names = json.loads(args.labels.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{args.labels}: cannot read the labels file: {error}") from None
        resize = load_params(args.params).preprocess.resize
        predictions, failures = predict(args.images, args.model, class_names, resize)
        for path, name, confidence in predictions:
            print(f"{path}\t{name}\t{confidence:.4f}")
        for path, reason in failures:
            print(f"predict: error: {path}: {reason}", file=sys.stderr)
        failed.extend(failures)

    code = run_stage("predict", body)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    raise SystemExit(main())
