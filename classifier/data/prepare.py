"""Decode, resize and split raw images into train / val / test image sets.

The prepared folder holds ``train/``, ``val/`` and ``test/`` image sets (see
classifier/data/dataset.py) at the configured size and channels, ``classes.json`` (the
labels file that training, export and serving use) and ``counts.json``.

Splits are stratified by class and a pure function of ``preprocess.seed``. Exact copies and
near duplicates (classifier/data/duplicates.py) form groups, and each group lands whole in
one split, so no image is evaluated on a copy of itself. A source with its own test set
(MNIST-like IDX files) keeps it; validation is then carved from training, ``test_fraction``
is not used, and training images that duplicate a test image are dropped (with
``preprocess.drop_test_duplicates_from_train``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classifier.atomic import atomic_path, write_json
from classifier.config import PreprocessParams
from classifier.data.dataset import CLASSES_FILE, SPLITS, ImageSet, read_image_set, write_image_set
from classifier.data.duplicates import DROPPED, DuplicateGroups, find_duplicates, member_table
from classifier.data.images import UnreadableImage, load_image, resize_images
from classifier.data.raw import (
    FILES_DIR,
    FILES_LAYOUT,
    POOL_DIR,
    POOL_LAYOUT,
    SOURCE_FILE,
    SPLIT_FILES_LAYOUT,
    SPLIT_LAYOUT,
)
from classifier.errors import DataError

log = logging.getLogger(__name__)

COUNTS_FILE = "counts.json"


@dataclass
class Ingested:
    """Decoded raw images, before splitting, and what was learnt on the way."""

    pool: ImageSet | None = None  # to be split three ways
    train: ImageSet | None = None  # or the source's own train / test split
    test: ImageSet | None = None
    val: ImageSet | None = None  # and its validation split, where it has one
    origins: dict[str, list[str]] = field(default_factory=dict)  # where each image came from
    skipped: list[dict[str, str]] = field(default_factory=list)
    source_images: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class Assignment:
    """Every image of a source, its duplicate groups, and the split each image goes to."""

    images: ImageSet
    origins: list[str]
    groups: DuplicateGroups
    split_of: np.ndarray  # "train", "val", "test" or DROPPED, per image


def _resized(image_set: ImageSet, cfg: PreprocessParams) -> ImageSet:
    images = resize_images(
        image_set.images, cfg.image_height, cfg.image_width, cfg.channels, cfg.resize
    )
    return ImageSet(images, image_set.labels, image_set.class_names)


# Images decoded per task sent to a worker process: enough to amortise the round trip.
DECODE_CHUNK = 16
# Fewer images than this a worker are decoded in this process: starting one costs more.
MIN_IMAGES_PER_WORKER = 64


def decode_workers(images: int) -> int:
    """Processes to decode ``images`` on: this process's cores (OMP_NUM_THREADS, where set,
    is its share of them, as test workers and sweep trials are given), at most one per
    MIN_IMAGES_PER_WORKER images."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        cores = min(cores, int(share))
    return max(1, min(cores, images // MIN_IMAGES_PER_WORKER))


def _decode_file(task: tuple[Path, int, int, int, str]) -> tuple[Any, Any, str | None]:
    """One file as (pixels, what the source was, None), or (None, None, why unreadable)."""
    path, height, width, channels, policy = task
    try:
        pixels, source = load_image(path, height, width, channels, policy)
    except UnreadableImage as error:
        return None, None, str(error)
    return pixels, source, None


@contextlib.contextmanager
def decoded_files(paths: Sequence[Path], cfg: PreprocessParams) -> Iterator[Iterator[tuple]]:
    """``_decode_file`` of each path, in the order of ``paths``, on every core it may use.

    A process pool, not threads: decoding and resizing hold the GIL for much of their work.
    ``map`` hands results back in order, so the output does not depend on which worker was
    faster. The workers are forked, before any progress bar starts a thread, so they start
    at once and never run a copy of the caller's ``__main__``.
    """
    shape = (cfg.image_height, cfg.image_width, cfg.channels, cfg.resize)
    tasks = [(path, *shape) for path in paths]
    workers = decode_workers(len(tasks))
    if workers == 1:
        yield map(_decode_file, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool.map(_decode_file, tasks, chunksize=DECODE_CHUNK)


def ingest_files(files_dir: Path, cfg: PreprocessParams, work_dir: Path) -> Ingested:
    """Decode class folders of image files, on every core, into a memory-mapped array."""
    from tqdm import tqdm

    class_dirs = sorted(p for p in files_dir.iterdir() if p.is_dir())
    entries = [
        (path, label)
        for label, folder in enumerate(class_dirs)
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
    ]
    shape = (len(entries), cfg.image_height, cfg.image_width, cfg.channels)
    images = np.lib.format.open_memmap(work_dir / "images.npy", "w+", np.uint8, shape)
    labels = np.empty(len(entries), np.int64)
    origins, sources, skipped = [], [], []
    with decoded_files([path for path, _ in entries], cfg) as results:
        for (path, label), (pixels, source, unreadable) in tqdm(
            zip(entries, results, strict=True),
            total=len(entries),
            desc="decoding images",
            unit="image",
            disable=not sys.stderr.isatty(),
        ):
            origin = path.relative_to(files_dir).as_posix()
            if unreadable is not None:
                skipped.append({"file": origin, "reason": unreadable})
                continue
            images[len(origins)] = pixels
            labels[len(origins)] = label
            origins.append(origin)
            sources.append(source)

    if entries and len(skipped) / len(entries) > cfg.max_skipped_fraction:
        examples = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:3])
        raise DataError(
            f"{files_dir}: {len(skipped)} of {len(entries)} files are unusable "
            f"({len(skipped) / len(entries):.1%}), above preprocess.max_skipped_fraction="
            f"{cfg.max_skipped_fraction}; for example {examples}"
        )
    class_names = tuple(folder.name for folder in class_dirs)
    kept = len(origins)
    empty = sorted(set(class_names) - {class_names[i] for i in np.unique(labels[:kept])})
    if empty:
        raise DataError(f"{files_dir}: no readable images in class folder(s) {empty}")
    for skip in skipped:
        log.warning("skipped %s: %s", skip["file"], skip["reason"])
    return Ingested(
        pool=ImageSet(images[:kept], labels[:kept], class_names),
        origins={"pool": origins},
        skipped=skipped,
        source_images=pd.DataFrame(sources),
    )


def ingest(raw_dir: Path, cfg: PreprocessParams, work_dir: Path) -> Ingested:
    """Read whichever layout the download stage wrote (see classifier/data/sources.py)."""
    layout = read_source(raw_dir).get("layout")
    if layout == FILES_LAYOUT:
        return ingest_files(raw_dir / FILES_DIR, cfg, work_dir)
    if layout == POOL_LAYOUT:
        pool = _resized(read_image_set(raw_dir / POOL_DIR), cfg)
        return Ingested(pool=pool, origins={"pool": [f"#{i}" for i in range(len(pool.labels))]})
    if layout == SPLIT_LAYOUT:
        train = _resized(read_image_set(raw_dir / "train"), cfg)
        test = _resized(read_image_set(raw_dir / "test"), cfg)
        return Ingested(
            train=train,
            test=test,
            origins={
                "train": [f"train#{i}" for i in range(len(train.labels))],
                "test": [f"test#{i}" for i in range(len(test.labels))],
            },
        )
    if layout == SPLIT_FILES_LAYOUT:
        return ingest_split_files(raw_dir / FILES_DIR, cfg, work_dir)
    raise DataError(f"{raw_dir / SOURCE_FILE}: unknown layout {layout!r}")


def ingest_split_files(files_dir: Path, cfg: PreprocessParams, work_dir: Path) -> Ingested:
    """Decode the class folders of each split folder (train/, test/, maybe val/)."""
    parts: dict[str, Ingested] = {}
    for split in ("train", "val", "test"):
        if (files_dir / split).is_dir():
            (work_dir / split).mkdir(parents=True, exist_ok=True)
            parts[split] = ingest_files(files_dir / split, cfg, work_dir / split)
    return Ingested(
        train=parts["train"].pool,
        test=parts["test"].pool,
        val=parts["val"].pool if "val" in parts else None,
        origins={
            split: [f"{split}/{origin}" for origin in part.origins["pool"]]
            for split, part in parts.items()
        },
        skipped=[
            {**skip, "file": f"{split}/{skip['file']}"}
            for split, part in parts.items()
            for skip in part.skipped
        ],
        source_images=pd.concat([part.source_images for part in parts.values()]),
    )


def _stratified(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(
        indices, test_size=fraction, stratify=labels[indices], random_state=seed
    )


def _units(labels: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each image's unit (its group, numbered in order of first image) and each unit's label.

    A unit's label is its images' most common one, the smallest on a tie. Without groups,
    or where every group is one image, units are the images in order, with their labels.
    """
    if groups is None:
        return np.arange(len(labels)), labels
    unit_of_image, _ = pd.factorize(groups)
    tally = pd.DataFrame({"unit": unit_of_image, "label": labels}).value_counts().reset_index()
    ranked = tally.sort_values(["unit", "count", "label"], ascending=[True, False, True])
    return unit_of_image, ranked.drop_duplicates("unit")["label"].to_numpy()


def _members(unit_of_image: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Sorted indices of the images in ``units``."""
    return np.flatnonzero(np.isin(unit_of_image, units))


def _too_small(unit_labels: np.ndarray, class_names: Sequence[str] | None, need: int) -> str:
    """The classes with fewer than ``need`` units, by name: what a person can go and fix."""
    counts = np.bincount(unit_labels, minlength=len(class_names or ()))
    small = [
        f"{class_names[label] if class_names else label!r}: {count}"
        for label, count in enumerate(counts)
        if count < need
    ]
    if not small:
        return ""
    return (
        f"classes with fewer than {need} images (one for each split) once duplicates are "
        f"joined: {', '.join(small)}; add images to them or remove their folders"
    )


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, disjoint index sets for train / val / test, reproducible from ``seed``.

    With ``groups`` (one id per image, shared by duplicates), each group lands whole in one
    split and is stratified as one image of its most common label. Where no group has two
    images, the split is exactly the one without groups.
    """
    unit_of_image, unit_labels = _units(labels, groups)
    try:
        rest, test = _stratified(np.arange(len(unit_labels)), unit_labels, test_fraction, seed)
        train, val = _stratified(rest, unit_labels, val_fraction / (1 - test_fraction), seed)
    except ValueError as error:
        joined = len(unit_labels) < len(labels)
        grouped = f" ({len(unit_labels)} once duplicates are joined)" if joined else ""
        why = _too_small(unit_labels, class_names, need=len(SPLITS)) or str(error)
        raise DataError(
            f"cannot split {len(labels)} images in {len(np.unique(labels))} classes{grouped} "
            f"into train/val/test with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}: {why}"
        ) from None
    parts = {"train": train, "val": val, "test": test}
    return {split: _members(unit_of_image, units) for split, units in parts.items()}


def carve_validation(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Stratified train / val index sets of a training set, each group of duplicates in one."""
    unit_of_image, unit_labels = _units(labels, groups)
    try:
        train, val = _stratified(np.arange(len(unit_labels)), unit_labels, val_fraction, seed)
    except ValueError as error:
        raise DataError(f"cannot carve validation images out of training: {error}") from None
    return {"train": _members(unit_of_image, train), "val": _members(unit_of_image, val)}


def _subset(image_set: ImageSet, indices: np.ndarray) -> ImageSet:
    return ImageSet(image_set.images[indices], image_set.labels[indices], image_set.class_names)


def _require_classes(image_set: ImageSet) -> None:
    if len(image_set.class_names) < 2:
        raise DataError(f"need at least 2 classes to classify, got {list(image_set.class_names)}")


def _pool_splits(data: Ingested, cfg: PreprocessParams) -> Assignment:
    """Split the pool three ways, each duplicate group whole."""
    pool = data.pool
    groups = find_duplicates(pool.images, cfg.near_duplicate_distance)
    parts = split_indices(
        pool.labels, cfg.val_fraction, cfg.test_fraction, cfg.seed, groups.group, pool.class_names
    )
    split_of = np.empty(len(pool.labels), object)
    for split, indices in parts.items():
        split_of[indices] = split
    return Assignment(pool, data.origins["pool"], groups, split_of)


def _given_test_splits(data: Ingested, cfg: PreprocessParams) -> Assignment:
    """Keep the source's test set, and its validation set where it has one; else carve
    validation out of the training images.

    Training (and validation) images that duplicate a test image are dropped with
    ``preprocess.drop_test_duplicates_from_train``, else kept (and reported as leakage).
    """
    given = {"train": data.train, "test": data.test}
    if data.val is not None:
        given["val"] = data.val
    for split, image_set in given.items():
        if image_set.class_names != data.train.class_names:
            raise DataError(
                f"the source's {split} images have other classes than its training images"
            )
    whole = ImageSet(
        np.concatenate([image_set.images for image_set in given.values()]),
        np.concatenate([image_set.labels for image_set in given.values()]),
        data.train.class_names,
    )
    split_of = np.concatenate(
        [np.full(len(image_set.labels), split, dtype=object) for split, image_set in given.items()]
    )
    groups = find_duplicates(whole.images, cfg.near_duplicate_distance)
    in_test = split_of == "test"
    copies_of_test = ~in_test & np.isin(groups.group, groups.group[in_test])
    if cfg.drop_test_duplicates_from_train:
        split_of[copies_of_test] = DROPPED
    log.info(
        "%d training images duplicate a test image: %s",
        copies_of_test.sum(),
        "dropped" if cfg.drop_test_duplicates_from_train else "kept",
    )
    if data.val is None:
        kept = np.flatnonzero(split_of == "train")
        parts = carve_validation(whole.labels[kept], groups.group[kept], cfg.val_fraction, cfg.seed)
        split_of[kept[parts["val"]]] = "val"
    origins = [origin for split in given for origin in data.origins[split]]
    return Assignment(whole, origins, groups, split_of)


def make_splits(data: Ingested, cfg: PreprocessParams) -> tuple[dict[str, ImageSet], pd.DataFrame]:
    """Train / val / test image sets, and the members of every duplicate group.

    Each group of duplicates lies in one split (see classifier/data/duplicates.py); the
    table (:func:`member_table`) gives each member's split (or ``dropped``) and origin.
    """
    whole = data.pool if data.pool is not None else data.train
    _require_classes(whole)
    assigned = (_pool_splits if data.pool is not None else _given_test_splits)(data, cfg)
    class_names = np.asarray(assigned.images.class_names, dtype=object)
    duplicates = member_table(
        assigned.groups,
        split=assigned.split_of,
        origin=assigned.origins,
        label=class_names[assigned.images.labels],
    )
    splits = {
        split: _subset(assigned.images, np.flatnonzero(assigned.split_of == split))
        for split in SPLITS
    }
    return splits, duplicates


def read_source(raw_dir: Path) -> dict[str, object]:
    """What the download stage recorded about the raw images in ``raw_dir``."""
    path = Path(raw_dir) / SOURCE_FILE
    try:
        source = json.loads(path.read_text())
    except (OSError, ValueError):
        source = None
    if not isinstance(source, dict):
        raise DataError(f"{path}: missing or unreadable; run download first")
    return source


def write_prepared(out_dir: Path, splits: dict[str, ImageSet]) -> None:
    """Write the three splits, the labels file and the counts into ``out_dir`` atomically."""
    with atomic_path(out_dir, directory=True) as tmp:
        for split, image_set in splits.items():
            write_image_set(tmp / split, image_set)
        class_names = list(splits["train"].class_names)
        (tmp / CLASSES_FILE).write_text(json.dumps(class_names) + "\n")
        write_json(tmp / COUNTS_FILE, {split: splits[split].class_counts() for split in SPLITS})
