import json

import numpy as np
import pytest

from classifier.data.dataset import SPLITS, ImageSet, read_image_set
from classifier.data.images import resize_images
from classifier.data.prepare import split_indices
from classifier.errors import DataError
from stages import preprocess
from tests.helpers import make_image_folder, project_params, write_raw_pool


def run_preprocess(cfg, tmp_path):
    return preprocess.run(
        cfg,
        raw_dir=tmp_path / "raw",
        out_dir=tmp_path / "prepared",
        metrics_path=tmp_path / "data.json",
        report_path=tmp_path / "data.md",
    )


def test_resize_makes_every_image_the_configured_size():
    gradient = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (3, 8, 1))[..., None]
    resized = resize_images(gradient, 28, 20, 1)
    assert resized.shape == (3, 28, 20, 1)
    assert resized.dtype == np.uint8
    # Bilinear resizing keeps a left-to-right ramp a ramp.
    assert resized[0, 10, 0, 0] < resized[0, 10, 10, 0] < resized[0, 10, 19, 0]


def test_resize_converts_grayscale_to_rgb_and_back():
    gray = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    rgb = resize_images(gray, 28, 28, 3)
    assert rgb.shape == (2, 28, 28, 3)
    np.testing.assert_array_equal(rgb[..., 0], gray[..., 0])
    np.testing.assert_array_equal(rgb[..., 2], gray[..., 0])
    np.testing.assert_array_equal(resize_images(rgb, 28, 28, 1), gray)


def test_split_is_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(4), [100, 60, 40, 200])
    parts = split_indices(labels, val_fraction=0.2, test_fraction=0.25, seed=1)
    combined = np.concatenate([parts[s] for s in SPLITS])
    assert sorted(combined) == list(range(len(labels)))
    for split, share in (("test", 0.25), ("val", 0.2)):
        counts = np.bincount(labels[parts[split]], minlength=4)
        np.testing.assert_allclose(counts, share * np.bincount(labels), atol=1)


def test_split_is_a_function_of_the_seed():
    labels = np.repeat(np.arange(3), 50)
    first = split_indices(labels, 0.2, 0.2, seed=7)
    again = split_indices(labels, 0.2, 0.2, seed=7)
    other = split_indices(labels, 0.2, 0.2, seed=8)
    for split in SPLITS:
        np.testing.assert_array_equal(first[split], again[split])
    assert any(not np.array_equal(first[s], other[s]) for s in SPLITS)


def test_run_writes_three_splits_and_their_counts(tmp_path):
    rng = np.random.default_rng(0)
    raw = ImageSet(
        rng.integers(0, 256, (90, 8, 8, 1), dtype=np.uint8),
        np.repeat(np.arange(3), 30),
        ("a", "b", "c"),
    )
    write_raw_pool(tmp_path / "raw", raw)
    cfg = project_params(preprocess={"image_height": 20, "image_width": 24}).preprocess
    run_preprocess(cfg, tmp_path)

    counts = json.loads((tmp_path / "prepared" / "counts.json").read_text())
    assert json.loads((tmp_path / "prepared" / "classes.json").read_text()) == ["a", "b", "c"]
    assert json.loads((tmp_path / "data.json").read_text())["images"]["test"] == len(
        read_image_set(tmp_path / "prepared" / "test").labels
    )
    total = 0
    for split in SPLITS:
        image_set = read_image_set(tmp_path / "prepared" / split)
        assert image_set.image_shape == (20, 24, 1)
        assert counts[split] == image_set.class_counts()
        total += len(image_set.labels)
    assert total == 90


def test_too_few_images_for_the_split_is_a_clear_error(tmp_path):
    raw = ImageSet(np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 0, 1, 1]), ("a", "b"))
    write_raw_pool(tmp_path / "raw", raw)
    with pytest.raises(DataError, match=r"cannot split 4 images in 2 classes"):
        run_preprocess(project_params().preprocess, tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_a_single_class_is_rejected(tmp_path):
    raw = ImageSet(np.zeros((40, 8, 8, 1), np.uint8), np.zeros(40, np.int64), ("only",))
    write_raw_pool(tmp_path / "raw", raw)
    with pytest.raises(DataError, match="need at least 2 classes"):
        run_preprocess(project_params().preprocess, tmp_path)


def photo_params(**preprocess_overrides):
    return project_params(
        preprocess={
            "image_height": 32,
            "image_width": 32,
            "channels": 3,
            "resize": "pad",
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            **preprocess_overrides,
        }
    ).preprocess


def download_photos(tmp_path, **folder_options):
    from classifier.config import DataParams
    from stages import download

    written = make_image_folder(tmp_path / "photos", **folder_options)
    download.run(
        DataParams(source="folder", path=str(tmp_path / "photos"), mirrors=[]),
        out_dir=tmp_path / "raw",
    )
    return written


def test_folder_images_of_every_kind_are_decoded_and_broken_ones_reported(tmp_path):
    download_photos(tmp_path, per_class=8)
    splits = run_preprocess(photo_params(max_skipped_fraction=0.2), tmp_path)
    assert sum(len(s.labels) for s in splits.values()) == 16
    assert all(s.image_shape == (32, 32, 3) for s in splits.values())
    # Cats are bright on the left, dogs on the right, whatever the file's mode or size.
    train = splits["train"]
    left, right = (
        train.images[:, :, :12].mean(axis=(1, 2, 3)),
        train.images[:, :, 20:].mean(axis=(1, 2, 3)),
    )
    np.testing.assert_array_equal(left > right, train.labels == 0)

    metrics = json.loads((tmp_path / "data.json").read_text())
    assert metrics["skipped_files"] == 3
    report = (tmp_path / "data.md").read_text()
    assert "| cats/truncated.jpg | corrupt or truncated" in report
    assert "| dogs/empty.png     | empty file" in report
    assert "| dogs/notes.txt     | not an image" in report
    for kind in ("| JPEG ", "| PNG ", "| GIF ", "| BMP ", "| WEBP "):
        assert kind in report


def test_too_many_broken_files_fail_the_stage_and_write_nothing(tmp_path):
    download_photos(tmp_path, per_class=8)
    with pytest.raises(DataError, match=r"3 of 19 files are unusable \(15.8%\), above preprocess"):
        run_preprocess(photo_params(max_skipped_fraction=0.1), tmp_path)
    assert not (tmp_path / "prepared").exists()
    assert not (tmp_path / "data.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
