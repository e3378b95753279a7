import numpy as np
import pytest
from sklearn.datasets import load_digits

from stages import download
from stages.config import DataParams
from stages.dataset import read_image_set


def test_digits_source_writes_all_1797_digits_as_uint8(tmp_path):
    written = download.run(DataParams(source="digits"), tmp_path / "raw")
    loaded = read_image_set(tmp_path / "raw")
    digits = load_digits()
    assert loaded.images.shape == (1797, 8, 8, 1)
    assert loaded.images.dtype == np.uint8
    assert (loaded.images.min(), loaded.images.max()) == (0, 255)
    # Scaling back to scikit-learn's 0..16 intensities recovers them exactly.
    np.testing.assert_array_equal(
        np.rint(loaded.images[..., 0].astype(float) * 16 / 255), digits.images
    )
    np.testing.assert_array_equal(loaded.labels, digits.target)
    assert loaded.class_names == tuple("0123456789")
    assert sum(written.class_counts().values()) == 1797


def test_failed_download_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    download.run(DataParams(source="digits"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_source():
        raise OSError("connection reset")

    monkeypatch.setitem(download.SOURCES, "digits", broken_source)
    with pytest.raises(OSError, match="connection reset"):
        download.run(DataParams(source="digits"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
