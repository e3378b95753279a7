"""The images a person has looked at and decided about: drop them, or give them another label.

``exclude.yaml`` (versioned in git beside params.yaml) lists entries by the image's
content hash, the one ``label_issues`` prints for each suspect and
classifier/data/duplicates.py computes (blake2b of the prepared pixels, so an entry
follows the image whatever its file was called, and covers every exact copy of it)::

    images:
      - hash: "5f0c8e2d9a41b7c3e6f01a2b"   # quoted: all digits would read as a number
        action: drop                # not an image of any class
        note: a smudge, not a digit
      - hash: "0d7e1c4b2a9f8e3d6c5b4a39"
        action: relabel
        label: "7"                  # the class name it should have

``preprocess`` applies the file after splitting, so an entry never moves another image to
another split: the test set stays the test set it was, and a model trained on the
cleaned data is scored against the champion on the same test images (with a dropped or
relabelled test image removed or corrected for both). Editing the file reruns preprocess
and everything after it: retraining on the cleaned data is an ordinary ``dvc exp run``.

Hashes are of the prepared pixels: another ``preprocess.image_height``, ``channels`` or
``resize`` gives other hashes, and entries that match no image are reported (and logged),
not silently applied to nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.config import read_yaml
from classifier.data.dataset import ImageSet
from classifier.data.duplicates import image_hashes
from classifier.errors import DataError

log = logging.getLogger(__name__)

EXCLUDE_FILE = "exclude.yaml"
DROP = "drop"
RELABEL = "relabel"
ACTIONS = (DROP, RELABEL)
HASH_PATTERN = re.compile(r"^[0-9a-f]{24}$")  # image_hashes: blake2b, 12 bytes, hex
ENTRY_KEYS = {"hash", "action", "label", "note"}


@dataclass(frozen=True)
class Exclusion:
    """One decision about one image (and its exact copies)."""

    hash: str
    action: str  # drop | relabel
    label: str | None = None  # the class name, for relabel


def _entry(path: Path, number: int, entry: object) -> Exclusion:
    where = f"{path}: images[{number}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with hash and action, got {entry!r}")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; expected {sorted(ENTRY_KEYS)}")
    if not isinstance(entry.get("hash"), str):
        raise DataError(
            f"{where}: hash must be a quoted string (YAML reads 24 unquoted digits as a "
            f'number): hash: "<the 24 hex digits label_issues prints>", got {entry.get("hash")!r}'
        )
    image_hash = entry["hash"].strip().lower()
    if not HASH_PATTERN.match(image_hash):
        raise DataError(
            f"{where}: hash must be the 24 hex digits label_issues prints, got "
            f"{entry.get('hash')!r}"
        )
    action = entry.get("action")
    if action not in ACTIONS:
        raise DataError(f"{where}: action must be drop or relabel, got {action!r}")
    label = entry.get("label")
    if action == RELABEL and (label is None or str(label) == ""):
        raise DataError(f"{where}: relabel needs a label (a class name)")
    if action == DROP and label is not None:
        raise DataError(f"{where}: drop takes no label (use action: relabel to change it)")
    return Exclusion(image_hash, action, None if label is None else str(label))


def read_exclusions(path: Path) -> list[Exclusion]:
    """The entries of ``path``; an error names the entry and what was expected."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        return []
    if not isinstance(raw, dict) or set(raw) != {"images"}:
        raise DataError(f"{path}: expected one key, images: a list of entries (may be [])")
    entries = raw["images"] or []
    if not isinstance(entries, list):
        raise DataError(f"{path}: images must be a list, got {type(entries).__name__}")
    exclusions = [_entry(path, number, entry) for number, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for number, exclusion in enumerate(exclusions):
        if exclusion.hash in seen:
            raise DataError(
                f"{path}: images[{number}] repeats the hash of images[{seen[exclusion.hash]}] "
                f"({exclusion.hash}); keep one decision per image"
            )
        seen[exclusion.hash] = number
    return exclusions


def apply_exclusions(
    splits: dict[str, ImageSet], exclusions: list[Exclusion]
) -> tuple[dict[str, ImageSet], dict[str, int]]:
    """``splits`` without the dropped images and with the relabelled ones' new labels.

    Returns the new splits and the counts: images dropped and relabelled (copies
    included), and entries that matched no image.
    """
    if not exclusions:
        return splits, {"dropped": 0, "relabelled": 0, "unmatched_entries": 0}
    class_names = next(iter(splits.values())).class_names
    for exclusion in exclusions:
        if exclusion.action == RELABEL and exclusion.label not in class_names:
            raise DataError(
                f"{EXCLUDE_FILE}: relabel of {exclusion.hash} to {exclusion.label!r}, which is "
                f"not a class; the classes are {list(class_names)}"
            )
    by_hash = {exclusion.hash: exclusion for exclusion in exclusions}
    matched: set[str] = set()
    dropped = relabelled = 0
    cleaned = {}
    for split, image_set in splits.items():
        hashes = image_hashes(image_set.images)
        keep = np.ones(len(hashes), bool)
        labels = image_set.labels.copy()
        for index, image_hash in enumerate(hashes):
            exclusion = by_hash.get(image_hash)
            if exclusion is None:
                continue
            matched.add(image_hash)
            if exclusion.action == DROP:
                keep[index] = False
                dropped += 1
            else:
                labels[index] = class_names.index(exclusion.label)
                relabelled += 1
        cleaned[split] = ImageSet(image_set.images[keep], labels[keep], class_names)
    unmatched = len(by_hash) - len(matched)
    if unmatched:
        log.warning(
            "%d %s entries match no image (another image size, channels or resize?)",
            unmatched,
            EXCLUDE_FILE,
        )
    log.info("%s: dropped %d images, relabelled %d", EXCLUDE_FILE, dropped, relabelled)
    counts = {"dropped": dropped, "relabelled": relabelled, "unmatched_entries": unmatched}
    return cleaned, counts
