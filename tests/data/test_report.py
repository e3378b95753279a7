import numpy as np
import pandas as pd

from classifier.data.dataset import ImageSet
from classifier.data.report import build_report


def image_set(values, labels):
    images = np.stack([np.full((4, 4, 1), v, np.uint8) for v in values])
    return ImageSet(images, np.array(labels), ("a", "b"))


def test_report_counts_duplicates_within_and_across_splits():
    splits = {
        "train": image_set([1, 2, 2, 3], [0, 1, 1, 0]),  # 2 appears twice in train
        "val": image_set([3, 4], [0, 1]),  # 3 leaks from train into val
        "test": image_set([5, 6], [0, 1]),
    }
    origins = {split: [f"{split}#{i}" for i in range(len(s.labels))] for split, s in splits.items()}
    skipped = [{"file": "a/broken.jpg", "reason": "corrupt or truncated: x"}]
    metrics, markdown = build_report(
        {"source": "folder", "layout": "files"}, splits, origins, skipped, pd.DataFrame()
    )
    assert metrics["images"] == {"train": 4, "val": 2, "test": 2}
    assert metrics["duplicate_copies"] == 2  # one extra 2, one extra 3
    assert metrics["duplicates_across_splits"] == 1  # only 3 crosses splits
    assert metrics["skipped_files"] == 1
    assert metrics["pixel_mean"] == round(np.mean([1, 2, 2, 3]) / 255, 6)
    assert "| a/broken.jpg | corrupt or truncated: x |" in markdown
    assert "train#3" in markdown and "val#0" in markdown


def test_report_describes_source_files():
    splits = {s: image_set([1, 2], [0, 1]) for s in ("train", "val", "test")}
    origins = {s: ["x", "y"] for s in splits}
    sources = pd.DataFrame(
        [
            {"format": "JPEG", "mode": "RGB", "width": 640, "height": 480},
            {"format": "PNG", "mode": "RGBA", "width": 32, "height": 32},
            {"format": "JPEG", "mode": "RGB", "width": 1024, "height": 768},
        ]
    )
    _, markdown = build_report(
        {"source": "folder", "layout": "files"}, splits, origins, [], sources
    )
    assert "| JPEG     | RGB    |        2 |" in markdown
    assert "| max    |    1024 |      768 |" in markdown
