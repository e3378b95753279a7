"""Duplicate groups: exact copies and near duplicates (a resized or re-encoded copy).

Exact duplicates have identical prepared pixels (a content hash). Near duplicates have
perceptual hashes (``imagehash.phash``, 64 bits) that differ in at most
``preprocess.near_duplicate_distance`` bits. A group is a connected component of "is a
duplicate of" (scipy's ``connected_components``), so a copy of a copy joins its original.

imagehash computes and compares hashes two at a time; finding every pair within a Hamming
distance among tens of thousands of hashes in seconds is done here, by the pigeonhole
principle: split the 64 bits into ``distance + 1`` disjoint parts, and two hashes within
``distance`` bits agree exactly on at least one part. Only hashes that share a part's
value (a bucket) are compared, with a vectorised popcount. A part takes every
``(distance + 1)``-th bit rather than a run of bits: phash's low-frequency bits are far
from uniform, and runs put MNIST's digits into a few large buckets (4x more pairs to check
at distance 4). Identical hashes are searched once, so thousands of blank images are one
bucket entry, not millions of pairs.

phash keeps coarse shape, not brightness: every flat image has the same hash, and at 28x28
many different handwritten digits (1s above all) share one too. Hence params.yaml's default
distance of 0; photos tolerate 4, which finds nearly every resized or re-encoded copy.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from classifier.errors import DataError

log = logging.getLogger(__name__)

HASH_BITS = 64  # imagehash.phash's default 8x8 hash
# Past this many candidate pairs (10 s or so) the distance is too large for the data: the
# search would take minutes to hours, so it fails with the reason instead.
MAX_CANDIDATE_PAIRS = 1_000_000_000
# The split named in member tables for a training image dropped as a copy of a test image.
DROPPED = "dropped"


@dataclass(frozen=True)
class DuplicateGroups:
    """For each image, the first image (lowest index) of its group: itself if it is unique."""

    group: np.ndarray  # exact copies and near duplicates, joined transitively
    exact: np.ndarray  # identical pixels only


def image_hashes(images: np.ndarray) -> list[str]:
    """A content hash per image: equal hashes mean identical pixels."""
    return [hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest() for image in images]


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """The 64-bit ``imagehash.phash`` of each uint8 image, as unsigned integers."""
    import imagehash
    from PIL import Image
    from tqdm import tqdm

    packed = np.empty((len(images), HASH_BITS // 8), np.uint8)
    for index, image in enumerate(
        tqdm(images, desc="hashing images", unit="image", disable=not sys.stderr.isatty())
    ):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        packed[index] = np.packbits(imagehash.phash(picture).hash)
    return packed.view(">u8").ravel().astype(np.uint64)


def _hash_bits(hashes: np.ndarray) -> np.ndarray:
    """(N, 64) array of 0/1, the first column the most significant bit."""
    return np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(-1, HASH_BITS // 8), axis=1)


def _bucket_keys(hashes: np.ndarray, parts: int) -> list[np.ndarray]:
    """Per part, each hash's value on that part's bits (every ``parts``-th bit)."""
    bits = _hash_bits(hashes).astype(np.uint64)
    keys = []
    for part in range(parts):
        columns = bits[:, part::parts]
        keys.append(columns @ (np.uint64(1) << np.arange(columns.shape[1], dtype=np.uint64)))
    return keys


def _candidate_count(keys: list[np.ndarray]) -> int:
    sizes = [np.unique(part_keys, return_counts=True)[1].astype(np.int64) for part_keys in keys]
    return int(sum((size * (size - 1) // 2).sum() for size in sizes))


def _bucket_pairs(keys: np.ndarray):
    """Every pair of positions that share a key, as (first, second) arrays, in batches.

    After sorting, members of a bucket are adjacent: pairs ``offset`` apart are yielded
    together, so no batch is longer than the number of hashes.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(sorted_keys[:-1] == sorted_keys[1:])
    offset = 1
    while len(starts):
        yield order[starts], order[starts + offset]
        offset += 1
        starts = starts[starts + offset < len(keys)]
        starts = starts[sorted_keys[starts] == sorted_keys[starts + offset]]


def near_pairs(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of 64-bit ``hashes`` that differ in at most ``distance`` bits.

    A pair may appear more than once (it shares a bucket in several parts).
    """
    hashes = np.asarray(hashes, np.uint64)
    keys = _bucket_keys(hashes, distance + 1)
    candidates = _candidate_count(keys)
    if candidates > MAX_CANDIDATE_PAIRS:
        raise DataError(
            f"near-duplicate search within {distance} bits would compare {candidates:,} pairs "
            f"of {len(hashes):,} distinct hashes (more than {MAX_CANDIDATE_PAIRS:,}); "
            "lower preprocess.near_duplicate_distance"
        )
    firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for part_keys in keys:
        for first, second in _bucket_pairs(part_keys):
            close = np.bitwise_count(hashes[first] ^ hashes[second]) <= distance
            firsts.append(first[close])
            seconds.append(second[close])
    return np.concatenate(firsts), np.concatenate(seconds)


def _first_members(labels: np.ndarray) -> np.ndarray:
    """Name each image's group (given as arbitrary ``labels``) by its lowest index."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return first[inverse]


def group_pairs(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Connected components of ``count`` images linked by the pairs, as first members."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    links = coo_array((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    _, labels = connected_components(links, directed=False)
    return _first_members(labels)


def find_duplicates(images: np.ndarray, distance: int) -> DuplicateGroups:
    """Group images with identical pixels or perceptual hashes within ``distance`` bits."""
    exact_codes, _ = pd.factorize(pd.Series(image_hashes(images)))
    exact = _first_members(exact_codes)
    # Copies share one perceptual hash: compute it once per distinct image, search it once.
    distinct = np.flatnonzero(exact == np.arange(len(images)))
    unique_hashes, hash_first, hash_of = np.unique(
        perceptual_hashes(images[distinct]), return_index=True, return_inverse=True
    )
    near_first, near_second = near_pairs(unique_hashes, distance)
    first = np.concatenate([exact, distinct[hash_first[hash_of]], distinct[hash_first[near_first]]])
    second = np.concatenate([np.arange(len(images)), distinct, distinct[hash_first[near_second]]])
    groups = DuplicateGroups(group=group_pairs(len(images), first, second), exact=exact)
    sizes = np.unique(groups.group, return_counts=True)[1]
    log.info(
        "%d images: %d groups of duplicates (exact, or within %d bits) hold %d of them",
        len(images),
        (sizes > 1).sum(),
        distance,
        sizes[sizes > 1].sum(),
    )
    return groups


def member_table(groups: DuplicateGroups, **columns: Sequence[object]) -> pd.DataFrame:
    """One row per image in a group of two or more: group, kind, exact copy id, ``columns``.

    Groups and exact copies are numbered from 1 in the order of their first image; kind is
    ``exact`` for an image with a pixel-identical copy in its group, else ``near``.
    """
    table = pd.DataFrame({"group": groups.group, "exact": groups.exact, **columns})
    in_group = table.groupby("group")["group"].transform("size") > 1
    copied = table.groupby("exact")["exact"].transform("size") > 1
    members = table[in_group].assign(kind=np.where(copied[in_group], "exact", "near"))
    members["group"] = pd.factorize(members["group"])[0] + 1
    members["exact"] = pd.factorize(members["exact"])[0] + 1
    ordered = members.sort_values("group", kind="stable").reset_index(drop=True)
    return ordered[["group", "kind", "exact", *columns]]
