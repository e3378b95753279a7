import gzip
import re

import numpy as np
import pytest

from classifier.data.idx import IdxError, read_idx, write_idx

ARRAYS = {
    "uint8 3-D": np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    "uint8 1-D": np.array([7, 2, 1, 0, 255], dtype=np.uint8),
    "int8": np.array([-128, 0, 127], dtype=np.int8),
    "int16": np.array([[-32768, 1], [2, 32767]], dtype=np.int16),
    "int32 little-endian": np.array([[-5, 300], [70000, -1]], dtype="<i4"),
    "float32": np.array([0.5, -1.25, np.inf], dtype=np.float32),
    "float64 big-endian": np.array([np.pi, -0.0, 1e300], dtype=">f8"),
}


def write_gzip(path, content):
    path.write_bytes(gzip.compress(content))
    return path


@pytest.mark.parametrize("name", ["images-idx", "images-idx.gz"])
@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_arrays_round_trip_plain_and_gzipped(tmp_path, name, array):
    write_idx(tmp_path / name, array)
    assert (tmp_path / name).read_bytes().startswith(b"\x1f\x8b") == name.endswith(".gz")
    loaded = read_idx(tmp_path / name)
    assert loaded.dtype == array.dtype.newbyteorder("=")
    assert loaded.dtype.isnative
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_the_header_is_the_published_mnist_layout(tmp_path):
    write_idx(tmp_path / "labels-idx1-ubyte", np.array([3, 1, 4], dtype=np.uint8))
    assert (tmp_path / "labels-idx1-ubyte").read_bytes() == b"\0\0\x08\x01\0\0\0\x03\x03\x01\x04"
    write_idx(tmp_path / "images-idx3-ubyte", np.zeros((2, 1, 3), dtype=np.int16))
    assert (tmp_path / "images-idx3-ubyte").read_bytes() == (
        b"\0\0\x0b\x03\0\0\0\x02\0\0\0\x01\0\0\0\x03" + bytes(2 * 1 * 3 * 2)
    )


def test_data_is_stored_big_endian(tmp_path):
    write_idx(tmp_path / "x", np.array([1], dtype="<i4"))
    assert (tmp_path / "x").read_bytes()[-4:] == b"\0\0\0\x01"


def test_gzip_is_told_by_content_not_by_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "gzipped-without-suffix", array, compress=True)
    write_idx(tmp_path / "plain-despite-suffix.gz", array, compress=False)
    assert (tmp_path / "gzipped-without-suffix").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "plain-despite-suffix.gz").read_bytes()[:2] == b"\0\0"
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-despite-suffix.gz"), array)


def test_read_array_is_writable(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 2), dtype=np.uint8))
    loaded = read_idx(tmp_path / "x.gz")
    loaded[0, 0] = 9  # a read-only view of the file's bytes would raise here
    assert loaded[0, 0] == 9


def test_write_replaces_an_existing_file(tmp_path):
    write_idx(tmp_path / "x", np.zeros(100, dtype=np.uint8))
    write_idx(tmp_path / "x", np.ones(2, dtype=np.uint8))
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), [1, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64, np.bool_, np.complex64])
def test_write_refuses_types_idx_cannot_hold(tmp_path, dtype):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'x'))}: IDX cannot hold"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=dtype))
    assert list(tmp_path.iterdir()) == []


MALFORMED = {
    "bad magic": (
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x05",
        r"not an IDX file \(bad magic number 01000801\)",
    ),
    "empty": (b"", r"not an IDX file \(bad magic number empty\)"),
    "unknown type": (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
    "truncated header": (
        b"\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00",
        "truncated IDX header: 3 dimensions need 16 bytes, found 10",
    ),
    "truncated data": (
        b"\x00\x00\x08\x01\x00\x00\x00\x04\x05",
        r"truncated IDX data: header says 4 bytes \(shape \(4,\), uint8\), found 1",
    ),
    "truncated wide data": (
        b"\x00\x00\x0c\x02\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(20),
        r"truncated IDX data: header says 24 bytes \(shape \(2, 3\), int32\), found 20",
    ),
    "trailing garbage": (
        b"\x00\x00\x08\x01\x00\x00\x00\x01\x05garbage",
        r"over-long IDX data: header says 1 bytes \(shape \(1,\), uint8\), found 8",
    ),
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize(("content", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_files_are_refused_naming_the_file(tmp_path, content, message, gzipped):
    path = tmp_path / "bad-idx1-ubyte.gz"
    if gzipped:
        write_gzip(path, content)
    else:
        path.write_bytes(content)
    with pytest.raises(IdxError, match=rf"^{re.escape(str(path))}: {message}"):
        read_idx(path)


def test_huge_declared_shape_is_refused_without_allocating_it(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(b"\0\0\x0e\x03" + b"\xff\xff\xff\xff" * 3 + bytes(8))
    with pytest.raises(IdxError, match=r"truncated IDX data: header says 6\d+ bytes"):
        read_idx(path)


def test_truncated_gzip_is_an_idx_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.arange(4000, dtype=np.int32))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(IdxError, match=rf"^{re.escape(str(path))}: corrupt gzip stream"):
        read_idx(path)


def test_damaged_gzip_is_an_idx_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.arange(4000, dtype=np.int32))
    damaged = bytearray(path.read_bytes())
    for offset in range(20, len(damaged) - 10, 7):
        damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(IdxError, match=rf"^{re.escape(str(path))}: corrupt gzip stream"):
        read_idx(path)


def test_gzip_with_garbage_after_the_stream_is_an_idx_error(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx(path, np.arange(10, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"not gzip")
    with pytest.raises(IdxError, match=rf"^{re.escape(str(path))}: corrupt gzip stream"):
        read_idx(path)
