"""The one on-disk format for images between stages: a folder of three files.

    images.npy    uint8, shape (N, height, width, channels), pixels 0-255 as people store them
    labels.npy    int64, shape (N,), class index of each image
    classes.json  JSON list of class names; labels index into it

``.npy`` is NumPy's documented format: any tool can read it, and large sets can be
memory-mapped instead of loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.errors import DataError

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
CLASSES_FILE = "classes.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageSet:
    """Images with their labels and the names of the classes the labels index."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                "images must be uint8 of shape (N, height, width, channels), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (len(self.images),):
            raise DataError(
                f"labels must have shape ({len(self.images)},), got {self.labels.shape}"
            )
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DataError(
                f"labels must lie in 0..{len(self.class_names) - 1} "
                f"(one per class name), got {self.labels.min()}..{self.labels.max()}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name, every class listed."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts, strict=True)}


def write_image_set(directory: Path, image_set: ImageSet) -> None:
    """Write ``image_set`` into ``directory`` (which the caller makes atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / IMAGES_FILE, image_set.images, allow_pickle=False)
    np.save(directory / LABELS_FILE, image_set.labels.astype(np.int64), allow_pickle=False)
    (directory / CLASSES_FILE).write_text(json.dumps(list(image_set.class_names)) + "\n")


def read_image_set(directory: Path) -> ImageSet:
    """Read an image set written by :func:`write_image_set`, with errors naming the file."""
    directory = Path(directory)
    for name in (IMAGES_FILE, LABELS_FILE, CLASSES_FILE):
        if not (directory / name).is_file():
            raise DataError(f"{directory / name}: missing; run the stage that writes it first")
    try:
        images = np.load(directory / IMAGES_FILE, allow_pickle=False)
        labels = np.load(directory / LABELS_FILE, allow_pickle=False)
        class_names = json.loads((directory / CLASSES_FILE).read_text())
    except (ValueError, OSError) as error:
        raise DataError(f"{directory}: unreadable image set: {error}") from None
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise DataError(f"{directory / CLASSES_FILE}: expected a JSON list of class names")
    try:
        return ImageSet(images, labels, tuple(class_names))
    except DataError as error:
        raise DataError(f"{directory}: {error}") from None


def read_splits(directory: Path) -> dict[str, ImageSet]:
    """Read the train, val and test image sets that ``preprocess`` writes."""
    return {split: read_image_set(Path(directory) / split) for split in SPLITS}
