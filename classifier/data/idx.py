"""Read and write IDX files, the format MNIST and Fashion-MNIST are published in.

Layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions, each dimension as a big-endian uint32, then the data in big-endian order.
Files may be gzipped; that is told by the gzip magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from classifier.atomic import atomic_path
from classifier.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
IDX_MAGIC = b"\0\0"
HEADER_SIZE = 4  # magic (2 bytes), type code, number of dimensions
MAX_DIM = 2**32 - 1
MAX_NDIM = 255
# IDX type code -> the big-endian dtype of the data on disk.
TYPE_CODES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (dtype kind, item size) -> IDX type code, so any byte order of a type maps to its code.
CODES_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in TYPE_CODES.items()}


class IdxError(DataError):
    """A file that is not a well-formed IDX file."""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic."""
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxError(f"{path}: corrupt gzip stream: {error}") from None


def read_idx(path: Path) -> np.ndarray:
    """The array stored in the IDX file at ``path`` (plain or gzipped), in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < HEADER_SIZE or data[:2] != IDX_MAGIC:
        raise IdxError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in TYPE_CODES:
        raise IdxError(
            f"{path}: unknown IDX type code 0x{code:02x} "
            f"(expected one of {', '.join(f'0x{c:02x}' for c in TYPE_CODES)})"
        )
    header_size = HEADER_SIZE + 4 * ndim
    if len(data) < header_size:
        raise IdxError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_size} bytes, "
            f"found {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[HEADER_SIZE:header_size])
    dtype = TYPE_CODES[code]
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    found = len(data) - header_size
    if found != expected:
        kind = "truncated" if found < expected else "over-long"
        raise IdxError(
            f"{path}: {kind} IDX data: header says {expected} bytes "
            f"(shape {tuple(shape)}, {dtype.name}), found {found}"
        )
    # astype copies, so the caller gets a writable array that owns its memory.
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.name)


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as IDX at ``path`` atomically; gzip when ``compress`` or a .gz name."""
    path = Path(path)
    array = np.asarray(array)
    code = CODES_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"{path}: IDX cannot hold {array.dtype} arrays "
            "(uint8, int8, int16, int32, float32 or float64)"
        )
    if array.ndim > MAX_NDIM or any(size > MAX_DIM for size in array.shape):
        raise ValueError(f"{path}: IDX cannot hold an array of shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(TYPE_CODES[code], copy=False).tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
