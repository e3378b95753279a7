import numpy as np
import pandas as pd
import pytest

from classifier.data.dataset import ImageSet
from classifier.data.duplicates import find_duplicates, member_table
from classifier.data.report import MAX_LISTED, build_report
from tests.helpers import markdown_rows, photo_crops


def image_set(values, labels):
    images = np.stack([np.full((4, 4, 1), v, np.uint8) for v in values])
    return ImageSet(images, np.array(labels), ("a", "b"))


def photo_set(indices, labels):
    """Small real photos: crops of scikit-learn's sample photos, scaled down to 32x32."""
    crops = photo_crops()
    return ImageSet(np.stack([crops[i][::4, ::4] for i in indices]), np.array(labels), ("a", "b"))


def members_where_they_are(splits, distance=0):
    """The duplicate groups' members, each in the split that ``splits`` put it in."""
    names = [split for split, image_set in splits.items() for _ in image_set.labels]
    positions = [i for image_set in splits.values() for i in range(len(image_set.labels))]
    groups = find_duplicates(np.concatenate([s.images for s in splits.values()]), distance)
    return member_table(
        groups,
        split=names,
        origin=[f"{split}#{i}" for split, i in zip(names, positions, strict=True)],
        label=np.concatenate([s.labels for s in splits.values()]),
    )


def test_report_counts_copies_and_the_groups_that_cross_splits():
    splits = {
        "train": photo_set([1, 2, 2, 3], [0, 1, 1, 0]),  # 2 appears twice in train
        "val": photo_set([3, 4], [0, 1]),  # 3 leaks from train into val
        "test": photo_set([5, 6], [0, 1]),
    }
    skipped = [{"file": "a/broken.jpg", "reason": "corrupt or truncated: x"}]
    metrics, markdown = build_report(
        {"source": "folder", "layout": "files"},
        splits,
        members_where_they_are(splits),
        skipped,
        pd.DataFrame(),
    )
    assert metrics["images"] == {"train": 4, "val": 2, "test": 2}
    assert metrics["duplicate_copies"] == 2  # one extra 2, one extra 3
    assert metrics["duplicates_across_splits"] == 1  # only 3 crosses splits
    assert metrics["duplicate_groups"] == 2
    assert metrics["duplicate_group_images"] == 4
    assert metrics["train_dropped_duplicating_test"] == 0
    assert metrics["skipped_files"] == 1
    assert metrics["pixel_mean"] == pytest.approx(splits["train"].images.mean() / 255, abs=1e-6)
    assert "| a/broken.jpg | corrupt or truncated: x |" in markdown
    assert "- 1 groups cross splits (leakage between training and evaluation)." in markdown
    rows = markdown_rows(markdown)
    assert ["2", "exact", "train", "train#3", "0"] in rows
    assert ["2", "exact", "val", "val#0", "0"] in rows


def test_report_lists_at_most_max_listed_members_and_counts_all():
    splits = {
        "train": image_set([0] * 70, [0, 1] * 35),  # 70 blank images: one group
        "val": image_set([1, 2], [0, 1]),
        "test": image_set([3, 4], [0, 1]),
    }
    members = members_where_they_are({"train": splits["train"]})
    metrics, markdown = build_report(
        {"source": "folder", "layout": "files"}, splits, members, [], pd.DataFrame()
    )
    assert metrics["duplicate_group_images"] == metrics["largest_duplicate_group"] == 70
    assert metrics["duplicate_copies"] == 69
    assert sum(row[2] == "train" for row in markdown_rows(markdown)) == MAX_LISTED
    assert f"... and {70 - MAX_LISTED} more." in markdown


def test_report_describes_source_files():
    splits = {s: photo_set([1, 2], [0, 1]) for s in ("train", "val", "test")}
    sources = pd.DataFrame(
        [
            {"format": "JPEG", "mode": "RGB", "width": 640, "height": 480},
            {"format": "PNG", "mode": "RGBA", "width": 32, "height": 32},
            {"format": "JPEG", "mode": "RGB", "width": 1024, "height": 768},
        ]
    )
    _, markdown = build_report(
        {"source": "folder", "layout": "files"}, splits, members_where_they_are(splits), [], sources
    )
    assert "| JPEG     | RGB    |        2 |" in markdown
    assert "| max    |    1024 |      768 |" in markdown


def test_pipes_and_newlines_in_names_cannot_break_the_report_tables():
    import re

    odd = ("cats|dogs", "b")
    splits = {
        s: ImageSet(photo_set([1, 2], [0, 1]).images, np.array([0, 1]), odd)
        for s in ("train", "val", "test")
    }
    skipped = [{"file": "cats/bad|name\n| x |.png", "reason": "not an image"}]
    folders = [{"folder": ".hidden|x", "files": "8", "reason": "hidden"}]
    _, markdown = build_report(
        {"source": "folder", "layout": "files", "skipped_folders": folders},
        splits,
        members_where_they_are(splits),
        skipped,
        pd.DataFrame(),
    )
    widths = set()
    for table in re.split(r"\n\s*\n", markdown):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        # Every row of a table has its header's cells, counting only unescaped pipes.
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) <= 1, table
    assert r"| cats\|dogs " in markdown
    assert r"cats/bad\|name\n\| x \|.png" in markdown
    assert "## Skipped folders" in markdown and r".hidden\|x" in markdown
