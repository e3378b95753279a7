"""Stage ``preprocess``: resize the raw images and split them into train / val / test.

Output folder: ``train/``, ``val/`` and ``test/`` image sets (see stages/dataset.py) at the
configured size and channels, and ``counts.json`` with the images per split and class.
The split is stratified by class and a pure function of ``preprocess.seed``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stages.atomic import atomic_path, write_json
from stages.cli import run_stage
from stages.config import DEFAULT_PARAMS_PATH, PreprocessParams, load_params
from stages.dataset import SPLITS, ImageSet, read_image_set, write_image_set
from stages.errors import DataError

log = logging.getLogger(__name__)

COUNTS_FILE = "counts.json"
PIL_MODES = {1: "L", 3: "RGB"}


def resize_images(images: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Resize (bilinear) and convert uint8 images to ``(N, height, width, channels)``."""
    if images.shape[1:] == (height, width, channels):
        return images
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    source_mode = PIL_MODES.get(images.shape[-1])
    if source_mode is None:
        raise DataError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    for index, pixels in enumerate(images):
        picture = Image.fromarray(pixels[..., 0] if source_mode == "L" else pixels, source_mode)
        picture = picture.convert(PIL_MODES[channels])
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        out[index] = np.asarray(picture).reshape(height, width, channels)
    return out


def split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Stratified, disjoint index sets for train / val / test, reproducible from ``seed``."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            everything, test_size=test_fraction, stratify=labels, random_state=seed
        )
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            stratify=labels[rest],
            random_state=seed,
        )
    except ValueError as error:
        raise DataError(
            f"cannot split {len(labels)} images in {len(np.unique(labels))} classes into "
            f"train/val/test with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}: {error}"
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def run(cfg: PreprocessParams, raw_dir: Path, out_dir: Path) -> dict[str, ImageSet]:
    """Resize and split the raw image set in ``raw_dir`` into ``out_dir`` atomically."""
    raw = read_image_set(raw_dir)
    if len(raw.class_names) < 2:
        raise DataError(
            f"{raw_dir}: need at least 2 classes to classify, got {len(raw.class_names)}"
        )
    images = resize_images(raw.images, cfg.image_height, cfg.image_width, cfg.channels)
    indices = split_indices(raw.labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits = {
        split: ImageSet(images[indices[split]], raw.labels[indices[split]], raw.class_names)
        for split in SPLITS
    }
    counts = {split: splits[split].class_counts() for split in SPLITS}
    with atomic_path(out_dir, directory=True) as tmp:
        for split, image_set in splits.items():
            write_image_set(tmp / split, image_set)
        write_json(tmp / COUNTS_FILE, counts)
    log.info(
        "wrote %s images of %dx%dx%d to %s",
        " / ".join(f"{len(splits[s].images)} {s}" for s in SPLITS),
        cfg.image_height,
        cfg.image_width,
        cfg.channels,
        out_dir,
    )
    return splits


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.preprocess",
        description="Resize raw images and split them into train/val/test (params: preprocess.*).",
    )
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw image set")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "preprocess", lambda: run(load_params(args.params).preprocess, args.raw, args.out)
    )


if __name__ == "__main__":
    raise SystemExit(main())
