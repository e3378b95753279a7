import json

import numpy as np
import pytest

from classifier.data.dataset import SPLITS, ImageSet, read_image_set
from classifier.data.images import resize_images
from classifier.data.prepare import split_indices
from classifier.errors import DataError
from stages import preprocess
from tests.helpers import (
    make_image_folder,
    markdown_rows,
    photo_crops,
    project_params,
    write_idx_files,
    write_photo_folder,
    write_raw_pool,
)


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


def test_a_class_with_one_image_is_named_in_the_split_error(tmp_path):
    labels = np.array([0] * 20 + [1] * 20 + [2])
    images = np.random.default_rng(0).integers(0, 256, (41, 8, 8, 1), dtype=np.uint8)
    write_raw_pool(tmp_path / "raw", ImageSet(images, labels, ("cats", "dogs", "a|rare one")))
    with pytest.raises(DataError) as error:
        run_preprocess(project_params().preprocess, tmp_path)
    assert "classes with fewer than 3 images (one for each split) once duplicates are joined: " in (
        str(error.value)
    )
    assert "'a|rare one': 1;" in str(error.value) and "cats" not in str(error.value)


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
        DataParams(source="folder", path=str(tmp_path / "photos"), mirrors=[], layout="auto"),
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


# --- Duplicates: each group of copies lies in one split --------------------------------------


def todays_split(labels, val_fraction, test_fraction, seed):
    """The split before duplicate groups: two stratified scikit-learn splits of the images."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, test = train_test_split(
        everything, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=labels[rest],
        random_state=seed,
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def test_split_with_one_image_per_group_is_todays_split():
    labels = np.random.default_rng(2).integers(0, 5, 400)
    distinct_groups = np.arange(400) * 7 + 3  # any ids, one image each
    for seed in (0, 1, 42):
        grouped = split_indices(labels, 0.15, 0.15, seed, groups=distinct_groups)
        expected = todays_split(labels, 0.15, 0.15, seed)
        for split in SPLITS:
            np.testing.assert_array_equal(grouped[split], expected[split])


def test_digits_split_is_todays_when_nothing_is_duplicated(prepared_digits):
    params = project_params()
    raw = read_image_set(prepared_digits.parent / "raw" / "pool")
    cfg = params.preprocess
    resized = resize_images(raw.images, cfg.image_height, cfg.image_width, cfg.channels, cfg.resize)
    metrics = json.loads((prepared_digits.parent / "data.json").read_text())

    assert metrics["duplicate_groups"] == 0
    assert metrics["images"] == {"train": 1257, "val": 270, "test": 270}
    expected = todays_split(raw.labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    for split in SPLITS:
        np.testing.assert_array_equal(
            read_image_set(prepared_digits / split).images, resized[expected[split]]
        )


def test_groups_land_whole_in_one_split_and_stay_stratified():
    rng = np.random.default_rng(5)
    group_sizes = rng.integers(1, 4, 300)  # 300 groups of 1 to 3 images
    groups = np.repeat(np.arange(300), group_sizes)
    labels = np.repeat(np.arange(300) % 3, group_sizes)
    # The first image of every triple gets another label: the group keeps its majority's.
    labels[np.flatnonzero(group_sizes[groups] == 3)[::3]] = (
        np.arange(300)[group_sizes == 3] + 1
    ) % 3
    for seed in (0, 1, 2):
        parts = split_indices(labels, 0.2, 0.2, seed, groups=groups)
        assert sorted(np.concatenate([parts[s] for s in SPLITS])) == list(range(len(labels)))
        in_split = {split: set(groups[parts[split]]) for split in SPLITS}
        assert not in_split["train"] & in_split["val"]
        assert not in_split["train"] & in_split["test"]
        assert not in_split["val"] & in_split["test"]
        # Stratified by group: a fifth of each class's groups in test, give or take one.
        for label in range(3):
            groups_of_label = np.arange(300)[np.arange(300) % 3 == label]
            in_test = np.isin(groups_of_label, list(in_split["test"])).sum()
            assert abs(in_test - 0.2 * len(groups_of_label)) <= 1


def splits_holding(splits, image):
    """The names of the splits that hold ``image``'s exact pixels."""
    return {
        split
        for split, image_set in splits.items()
        if (image_set.images == image).all(axis=(1, 2, 3)).any()
    }


def download_photo_folder(tmp_path):
    from classifier.config import DataParams
    from stages import download

    copies = write_photo_folder(tmp_path / "photos")
    download.run(
        DataParams(source="folder", path=str(tmp_path / "photos"), mirrors=[], layout="auto"),
        out_dir=tmp_path / "raw",
    )
    return copies


def test_exact_and_near_copies_never_cross_splits_whatever_the_seed(tmp_path):
    from classifier.data.images import load_image
    from classifier.data.prepare import ingest, make_splits

    copies = download_photo_folder(tmp_path)

    def prepared(name):
        return load_image(tmp_path / "photos" / name, 48, 48, 3, "pad")[0]

    images_by_seed = []
    for seed in (0, 1, 2, 3, 0):
        cfg = photo_params(image_height=48, image_width=48, near_duplicate_distance=8, seed=seed)
        work = tmp_path / f"work-{len(images_by_seed)}"
        work.mkdir()
        splits, _ = make_splits(ingest(tmp_path / "raw", cfg, work), cfg)

        assert sum(len(image_set.labels) for image_set in splits.values()) == 45
        for copy, original in copies.items():
            copy_splits = splits_holding(splits, prepared(copy))
            assert len(copy_splits) == 1, (seed, copy, copy_splits)
            assert splits_holding(splits, prepared(original)) == copy_splits, (seed, copy)
        images_by_seed.append({split: splits[split].images for split in SPLITS})

    first, *others, again = images_by_seed
    for split in SPLITS:
        np.testing.assert_array_equal(first[split], again[split])
    for other in others:
        assert any(
            first[split].shape != other[split].shape or (first[split] != other[split]).any()
            for split in SPLITS
        )


def write_idx_with_copies_of_test_images(folder):
    """Small IDX files whose training images 0-1 are exact and 2 a near copy of test images.

    Training images 3 and 4 are also the same image. Returns the arrays, by role.
    """
    import io

    from PIL import Image

    from classifier.data.idx import write_idx
    from classifier.data.images import decode_image
    from classifier.data.sources import IDX_FILES

    arrays = write_idx_files(folder, train=100, test=20)
    photo = Image.fromarray(photo_crops()[7]).convert("L")
    arrays["test_images"][2] = np.asarray(photo.resize((28, 28), Image.Resampling.BILINEAR))
    jpeg = io.BytesIO()
    photo.resize((42, 42), Image.Resampling.LANCZOS).save(jpeg, "JPEG", quality=85)
    arrays["train_images"][2] = decode_image(jpeg.getvalue(), 28, 28, 1, "stretch")[..., 0]
    arrays["train_images"][:2] = arrays["test_images"][:2]
    arrays["train_images"][4] = arrays["train_images"][3]
    for role in ("train_images", "test_images"):
        write_idx(folder / IDX_FILES[role], arrays[role])
    return arrays


@pytest.mark.parametrize("drop", [True, False])
def test_training_copies_of_a_given_test_set_are_reported_and_dropped_if_asked(tmp_path, drop):
    from classifier.config import DataParams
    from stages import download

    arrays = write_idx_with_copies_of_test_images(tmp_path / "idx")
    download.run(
        DataParams(source="idx_dir", path=str(tmp_path / "idx"), mirrors=[], layout="auto"),
        out_dir=tmp_path / "raw",
    )
    cfg = project_params(
        preprocess={"near_duplicate_distance": 8, "drop_test_duplicates_from_train": drop}
    ).preprocess
    splits = run_preprocess(cfg, tmp_path)
    metrics = json.loads((tmp_path / "data.json").read_text())
    report = (tmp_path / "data.md").read_text()

    train_and_val = {"train": splits["train"], "val": splits["val"]}
    leaked = [splits_holding(train_and_val, arrays["train_images"][i][..., None]) for i in range(3)]
    assert len(splits["test"].labels) == 20
    assert metrics["duplicate_groups"] == 4  # three copies of test images, one pair in train
    assert len(splits_holding(splits, arrays["train_images"][3][..., None])) == 1
    if drop:
        assert len(splits["train"].labels) + len(splits["val"].labels) == 97
        assert leaked == [set(), set(), set()]
        assert metrics["train_dropped_duplicating_test"] == 3
        assert metrics["duplicates_across_splits"] == 0
        assert ["3", "near", "dropped", "train#2", "2"] in markdown_rows(report)
        assert ["3", "near", "test", "test#2", "2"] in markdown_rows(report)
        assert "- 0 groups cross splits." in report
    else:
        assert len(splits["train"].labels) + len(splits["val"].labels) == 100
        assert all(len(found) == 1 for found in leaked)
        assert metrics["train_dropped_duplicating_test"] == 0
        assert metrics["duplicates_across_splits"] == 3
        assert "- 3 groups cross splits (leakage between training and evaluation)." in report


def test_report_lists_every_planted_copy_with_its_original_and_no_group_crosses(tmp_path):
    copies = download_photo_folder(tmp_path)
    cfg = photo_params(image_height=48, image_width=48, near_duplicate_distance=8)
    run_preprocess(cfg, tmp_path)
    metrics = json.loads((tmp_path / "data.json").read_text())
    report = (tmp_path / "data.md").read_text()

    assert metrics["duplicate_groups"] == len(copies) == 15
    assert metrics["duplicate_group_images"] == 30
    assert metrics["duplicate_copies"] == 8  # the byte-for-byte copies
    assert metrics["duplicates_across_splits"] == 0
    assert "- 0 groups cross splits." in report
    member = {row[3]: row for row in markdown_rows(report)[2:] if len(row) == 5}
    for copy, original in copies.items():
        group, kind, split, _, label = member[copy]
        assert member[original][:3] == [group, kind, split]
        assert kind == ("near" if copy.endswith(".jpg") else "exact")
        assert label == copy.split("/")[0]


def test_decoding_on_several_processes_gives_the_serial_result_in_order(tmp_path, monkeypatch):
    from classifier.data import prepare

    make_image_folder(tmp_path / "photos", per_class=30, broken=True)
    values = {"image_height": 20, "image_width": 20, "max_skipped_fraction": 0.2}
    cfg = project_params(preprocess=values).preprocess
    monkeypatch.setattr(prepare, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(prepare, "DECODE_CHUNK", 3)  # many chunks, finishing out of order
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(prepare.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert prepare.decode_workers(60) == 2
    (tmp_path / "pool").mkdir()
    pooled = prepare.ingest_files(tmp_path / "photos", cfg, tmp_path / "pool")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert prepare.decode_workers(60) == 1
    (tmp_path / "serial").mkdir()
    serial = prepare.ingest_files(tmp_path / "photos", cfg, tmp_path / "serial")
    np.testing.assert_array_equal(pooled.pool.images, serial.pool.images)
    np.testing.assert_array_equal(pooled.pool.labels, serial.pool.labels)
    assert pooled.origins == serial.origins and pooled.skipped == serial.skipped
    assert len(serial.skipped) == 4  # the broken files, named in the same order
    assert pooled.source_images.equals(serial.source_images)
