import numpy as np
import pytest

from classifier.data.dataset import CLASSES_FILE, ImageSet, read_image_set, write_image_set
from classifier.errors import DataError


def small_set() -> ImageSet:
    images = np.arange(6 * 4 * 5 * 3, dtype=np.uint8).reshape(6, 4, 5, 3)
    return ImageSet(images, np.array([0, 1, 2, 0, 1, 2]), ("cat", "dog", "fox"))


def test_image_set_round_trips_through_disk(tmp_path):
    original = small_set()
    write_image_set(tmp_path, original)
    loaded = read_image_set(tmp_path)
    np.testing.assert_array_equal(loaded.images, original.images)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    assert loaded.class_names == ("cat", "dog", "fox")
    assert loaded.image_shape == (4, 5, 3)
    assert loaded.class_counts() == {"cat": 2, "dog": 2, "fox": 2}


def test_missing_file_is_named(tmp_path):
    write_image_set(tmp_path, small_set())
    (tmp_path / CLASSES_FILE).unlink()
    with pytest.raises(DataError, match=rf"{tmp_path / CLASSES_FILE}: missing"):
        read_image_set(tmp_path)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((2, 4, 4, 1), np.float32), np.array([0, 1]), "must be uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), "must be uint8 of shape"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.array([0]), r"labels must have shape \(2,\)"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 2]), r"labels must lie in 0\.\.1"),
    ],
)
def test_malformed_image_sets_are_rejected(images, labels, message):
    with pytest.raises(DataError, match=message):
        ImageSet(images, labels, ("a", "b"))
