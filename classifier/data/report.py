"""The data validation report: what the images are, before anyone trains on them.

Counts per class and split, what the source files were (formats, modes, sizes), pixel
statistics, the groups of duplicates (exact and near, each kept in one split; see
classifier/data/duplicates.py), and skipped files.
Written as a DVC metrics file (numbers) and a Markdown page (tables) for people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from classifier.data.dataset import SPLITS, ImageSet
from classifier.data.duplicates import DROPPED

MAX_LISTED = 50  # rows shown of long lists (duplicates, skipped files); counts are complete


def _cell(value: object) -> object:
    """A table cell that cannot break its Markdown row: names come from people's files."""
    if not isinstance(value, str):
        return value
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "\\r").replace("\n", "\\n")


def markdown_table(table: pd.DataFrame, **options: object) -> str:
    """``table`` in Markdown with every text cell, index and column name escaped."""
    table = table.map(_cell).rename(index=_cell, columns=_cell)
    table.index.name = _cell(table.index.name)
    return table.to_markdown(**options)


def _counts_table(splits: Mapping[str, ImageSet]) -> pd.DataFrame:
    class_names = next(iter(splits.values())).class_names
    table = pd.DataFrame(
        {split: splits[split].class_counts() for split in splits}, index=list(class_names)
    )
    table.index.name = "class"
    table["total"] = table.sum(axis=1)
    table.loc["all classes"] = table.sum()
    return table


PIXEL_CHUNK = 1024  # images per step: statistics never need a float copy of the whole set


def _pixel_table(train: ImageSet) -> pd.DataFrame:
    """Per-channel mean and standard deviation on a 0..1 scale, from running sums."""
    channels = train.images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(train.images), PIXEL_CHUNK):
        chunk = train.images[start : start + PIXEL_CHUNK].reshape(-1, channels) / 255.0
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
    count = max(1, train.images[..., 0].size)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    names = ["gray"] if channels == 1 else ["red", "green", "blue"]
    return pd.DataFrame({"channel": names, "mean": mean, "std": std})


def _source_table(source_images: pd.DataFrame) -> pd.DataFrame:
    if source_images.empty:
        return pd.DataFrame()
    kinds = source_images.groupby(["format", "mode"]).size().rename("images").reset_index()
    return kinds.sort_values("images", ascending=False)


def _size_table(source_images: pd.DataFrame) -> pd.DataFrame:
    return (
        source_images[["width", "height"]]
        .describe()
        .loc[["min", "50%", "max"]]
        .rename(index={"50%": "median"})
        .astype(int)
    )


def _source_section(source_images: pd.DataFrame) -> list[str]:
    if source_images.empty:
        return []
    return [
        "## Source files",
        "",
        markdown_table(_source_table(source_images), index=False),
        "",
        "Size in pixels before resizing:",
        "",
        markdown_table(_size_table(source_images)),
        "",
    ]


def _at_most(lines: list[str], table: pd.DataFrame, total: int) -> list[str]:
    """``lines`` with ``table`` (the first MAX_LISTED rows of ``total``) in Markdown."""
    lines += [markdown_table(table.head(MAX_LISTED), index=False), ""]
    if total > MAX_LISTED:
        lines += [f"... and {total - MAX_LISTED} more.", ""]
    return lines


def duplicate_metrics(duplicates: pd.DataFrame) -> dict[str, int]:
    """Counts from the members of the duplicate groups (classifier/data/duplicates.py)."""
    kept = duplicates[duplicates["split"] != DROPPED]
    copies = kept[kept["kind"] == "exact"]
    sizes = duplicates.groupby("group").size()
    return {
        # Prepared images that are pixel-identical to another prepared image.
        "duplicate_copies": len(copies) - copies["exact"].nunique(),
        # Groups with prepared images in more than one split: leakage; 0 by construction.
        "duplicates_across_splits": int((kept.groupby("group")["split"].nunique() > 1).sum()),
        "duplicate_groups": len(sizes),
        "duplicate_group_images": int(sizes.sum()),
        "largest_duplicate_group": int(sizes.max()) if len(sizes) else 0,
        "train_dropped_duplicating_test": int((duplicates["split"] == DROPPED).sum()),
    }


def _duplicates_section(duplicates: pd.DataFrame, metrics: Mapping[str, int]) -> list[str]:
    across = metrics["duplicates_across_splits"]
    lines = [
        "## Duplicates",
        "",
        "Exact copies (identical pixels after resizing) and near duplicates (perceptual hashes "
        "within `preprocess.near_duplicate_distance` bits of each other: a resized or "
        "re-encoded copy) form groups, and each group is kept in one split.",
        "",
        f"- {metrics['duplicate_groups']} groups hold {metrics['duplicate_group_images']} "
        f"images (the largest: {metrics['largest_duplicate_group']}); "
        f"{metrics['duplicate_copies']} prepared images are exact copies of another.",
        f"- {across} groups cross splits"
        + (" (leakage between training and evaluation)." if across else "."),
        f"- {metrics['train_dropped_duplicating_test']} training images were dropped for "
        "duplicating a test image (sources with their own test set).",
        "",
    ]
    if not len(duplicates):
        return lines
    shown = duplicates[["group", "kind", "split", "origin", "label"]]
    return _at_most(lines, shown, len(duplicates))


def _skipped_section(skipped: Sequence[Mapping[str, str]]) -> list[str]:
    lines = ["## Skipped files", ""]
    if not skipped:
        return [*lines, "None.", ""]
    lines += [f"{len(skipped)} files could not be used as images:", ""]
    return _at_most(lines, pd.DataFrame(list(skipped)), len(skipped))


def _links_section(links: Sequence[Mapping[str, str]]) -> list[str]:
    lines = [
        "## Skipped links",
        "",
        "Links are followed only where they point inside the image folder.",
        "",
    ]
    if not links:
        return [*lines, "None.", ""]
    lines += [f"{len(links)} links were not followed:", ""]
    return _at_most(lines, pd.DataFrame(list(links)), len(links))


def _folders_section(folders: Sequence[Mapping[str, str]]) -> list[str]:
    if not folders:
        return []
    lines = ["## Skipped folders", "", f"{len(folders)} folders beside the classes were not read:"]
    return _at_most([*lines, ""], pd.DataFrame(list(folders)), len(folders))


def build_report(
    source: Mapping[str, object],
    splits: Mapping[str, ImageSet],
    duplicates: pd.DataFrame,
    skipped: Sequence[Mapping[str, str]],
    source_images: pd.DataFrame,
) -> tuple[dict[str, object], str]:
    """Return (metrics for DVC, Markdown for people) describing the prepared data.

    ``duplicates`` lists the members of the duplicate groups, with their split and origin
    (classifier/data/duplicates.py's ``member_table``).
    """
    counts = _counts_table(splits)
    pixels = _pixel_table(splits["train"])
    found = duplicate_metrics(duplicates)
    height, width, channels = splits["train"].image_shape

    metrics = {
        "images": {split: len(splits[split].labels) for split in SPLITS},
        "classes": len(splits["train"].class_names),
        "skipped_files": len(skipped),
        "skipped_links": len(source.get("skipped_links") or []),
        "skipped_folders": len(source.get("skipped_folders") or []),
        **found,
        "pixel_mean": round(float(pixels["mean"].mean()), 6),
        "pixel_std": round(float(pixels["std"].mean()), 6),
    }

    lines = [
        "# Data report",
        "",
        f"Source: `{source.get('source')}` ({source.get('layout')} layout). "
        f"Prepared images: {height}x{width}x{channels}, uint8, "
        f"{sum(metrics['images'].values())} in {metrics['classes']} classes.",
        "",
        "## Images per class and split",
        "",
        markdown_table(counts),
        "",
        "## Pixels (training split, scaled to 0..1)",
        "",
        markdown_table(pixels, index=False, floatfmt=".4f"),
        "",
    ]
    lines += _source_section(source_images)
    lines += _duplicates_section(duplicates, found)
    lines += _skipped_section(skipped)
    lines += _links_section(source.get("skipped_links") or [])
    lines += _folders_section(source.get("skipped_folders") or [])
    return metrics, "\n".join(lines)
