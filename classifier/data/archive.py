"""Extract a .zip or .tar(.gz) of images without trusting it.

The kind is told by content, not by name. Refused, with an error naming the archive and
the member: absolute paths and paths escaping the destination, links, devices and fifos,
encrypted members, more than ``max_members`` members, more than ``max_total_bytes``
(declared in the headers, and again as actually written) and compression ratios above
``max_ratio`` (zip bombs). macOS metadata (``__MACOSX/``, ``._*``) is skipped. Members
are extracted into a temporary folder beside the destination, renamed onto it only when
every member passed, so a refused or broken archive leaves nothing behind.
"""

from __future__ import annotations

import lzma
import posixpath
import re
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from classifier.atomic import atomic_path
from classifier.errors import DataError

CHUNK_SIZE = 1 << 20
DRIVE = re.compile(r"^[A-Za-z]:")
MACOS_METADATA_DIR = "__MACOSX"
APPLEDOUBLE_PREFIX = "._"
ZIP_ENCRYPTED_FLAG = 0x1
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK"
# What a damaged archive raises from the standard library while it is read.
CORRUPTION_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    struct.error,
    ValueError,
)


class ArchiveError(DataError):
    """An archive that is corrupt, not an archive, or unsafe to extract."""


@dataclass(frozen=True)
class _Member:
    """One archive entry, as the checks and the extraction see it."""

    name: str  # as stored, for messages
    is_dir: bool
    size: int  # declared uncompressed size
    open: Callable[[], IO[bytes]]


@contextmanager
def _reading(archive: Path, member: str | None = None) -> Iterator[None]:
    """Turn the standard library's many corruption errors into one ArchiveError."""
    try:
        yield
    except ArchiveError:
        raise
    except NotImplementedError as error:
        raise ArchiveError(f"{archive}: member {member!r}: unsupported: {error}") from None
    except CORRUPTION_ERRORS as error:
        where = f" in member {member!r}" if member else ""
        raise ArchiveError(f"{archive}: corrupt or truncated archive{where}: {error}") from None


def _safe_path(archive: Path, name: str) -> PurePosixPath | None:
    """Where member ``name`` goes, relative to the destination; None to skip it."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or DRIVE.match(normalised):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    relative = posixpath.normpath(normalised)
    if relative == ".." or relative.startswith("../"):
        raise ArchiveError(f"{archive}: member {name!r} escapes the destination folder")
    path = PurePosixPath(relative)
    if relative == "." or path.parts[0] == MACOS_METADATA_DIR:
        return None
    if path.name.startswith(APPLEDOUBLE_PREFIX):
        return None
    return path


def _zip_members(archive: Path, bundle: zipfile.ZipFile) -> list[_Member]:
    """The zip's members, refusing links, devices and encrypted entries."""
    members = []
    for info in bundle.infolist():
        mode = info.external_attr >> 16  # Unix mode, when a Unix tool wrote the zip
        if stat.S_ISLNK(mode):
            raise ArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"{archive}: member {info.filename!r} is a device or fifo")
        if info.flag_bits & ZIP_ENCRYPTED_FLAG:
            raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted")
        members.append(
            _Member(info.filename, info.is_dir(), info.file_size, lambda i=info: bundle.open(i))
        )
    return members


def _tar_members(archive: Path, bundle: tarfile.TarFile, max_members: int) -> list[_Member]:
    """The tar's members, refusing links, devices and fifos; stops past ``max_members``."""
    members = []
    for info in bundle:  # one header at a time, so a million-member tar stops early
        if info.issym():
            raise ArchiveError(f"{archive}: member {info.name!r} is a symbolic link")
        if info.islnk():
            raise ArchiveError(f"{archive}: member {info.name!r} is a hard link")
        if info.isdev():
            raise ArchiveError(f"{archive}: member {info.name!r} is a device or fifo")
        if not (info.isfile() or info.isdir()):
            raise ArchiveError(f"{archive}: member {info.name!r} has unsupported type {info.type}")
        size = info.size if info.isfile() else 0
        members.append(_Member(info.name, info.isdir(), size, lambda i=info: bundle.extractfile(i)))
        if len(members) > max_members:
            break
    return members


def _check_declared(
    archive: Path, members: list[_Member], max_members: int, max_total_bytes: int, max_ratio: float
) -> None:
    """Refuse before extracting anything: too many members, too many bytes, too compressed."""
    if len(members) > max_members:
        raise ArchiveError(
            f"{archive}: more than {max_members} members (member {members[max_members].name!r})"
        )
    total = 0
    for member in members:
        total += member.size
        if total > max_total_bytes:
            raise ArchiveError(
                f"{archive}: member {member.name!r} takes the declared size to {total} bytes, "
                f"more than {max_total_bytes}"
            )
    size = archive.stat().st_size
    ratio = total / max(1, size)
    if ratio > max_ratio:
        largest = max(members, key=lambda member: member.size)
        raise ArchiveError(
            f"{archive}: compression ratio {ratio:.0f} is above {max_ratio:g}: {total} bytes "
            f"from {size}, largest member {largest.name!r} of {largest.size} (a zip bomb?)"
        )


class _Writer:
    """Writes members under a folder, counting the bytes actually written against the limits."""

    def __init__(self, archive: Path, root: Path, max_total_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        self.root = root
        # Headers can lie: the same limits hold for what decompression really produces.
        self.max_bytes = min(max_total_bytes, int(max_ratio * max(1, archive.stat().st_size)))
        self.written = 0

    def write(self, member: _Member, path: PurePosixPath) -> None:
        """Create ``member`` at ``path`` under the root."""
        target = self.root.joinpath(*path.parts)
        try:
            if member.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            out = target.open("wb")
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise ArchiveError(
                f"{self.archive}: member {member.name!r} clashes with another member"
            ) from None
        with out:
            with _reading(self.archive, member.name):
                source = member.open()
            with source:
                while True:
                    # Only reads count as corruption; a failed write (disk full) is raised as is.
                    with _reading(self.archive, member.name):
                        chunk = source.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    self._count(member, len(chunk))
                    out.write(chunk)

    def _count(self, member: _Member, size: int) -> None:
        self.written += size
        if self.written > self.max_bytes:
            raise ArchiveError(
                f"{self.archive}: member {member.name!r} unpacks past the {self.max_bytes}-byte "
                "limit, although the headers declared less"
            )


def _archive_kind(archive: Path) -> str:
    """'tar' or 'zip', told by content; ArchiveError when it is neither."""
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file")
    with _reading(archive):
        # Tar first: a tar whose last member is a zip also passes is_zipfile.
        if tarfile.is_tarfile(archive):
            return "tar"
        if zipfile.is_zipfile(archive):
            return "zip"
    with archive.open("rb") as handle:
        head = handle.read(2)
    if head == ZIP_MAGIC:
        raise ArchiveError(f"{archive}: corrupt or truncated zip archive (no central directory)")
    if head == GZIP_MAGIC:
        raise ArchiveError(f"{archive}: corrupt or truncated archive (gzip without a tar inside)")
    raise ArchiveError(f"{archive}: not a zip or tar archive")


@contextmanager
def _open_bundle(archive: Path, kind: str) -> Iterator[zipfile.ZipFile | tarfile.TarFile]:
    """The open zip or tar, closed afterwards; corruption found on opening is an ArchiveError."""
    with ExitStack() as stack:
        with _reading(archive):
            if kind == "zip":
                bundle = stack.enter_context(zipfile.ZipFile(archive))
            else:  # "r:*": plain, gzip, bzip2 or xz, told by content
                bundle = stack.enter_context(tarfile.open(archive, "r:*"))
        yield bundle


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    max_members: int = 200_000,
    max_total_bytes: int = 20 * 2**30,
    max_ratio: float = 200.0,
) -> Path:
    """Extract ``archive`` (.zip, .tar, .tar.gz, .tgz) into ``dest``, safely and atomically."""
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)
    with atomic_path(dest, directory=True) as tmp, _open_bundle(archive, kind) as bundle:
        with _reading(archive):
            if isinstance(bundle, zipfile.ZipFile):
                members = _zip_members(archive, bundle)
            else:
                members = _tar_members(archive, bundle, max_members)
        _check_declared(archive, members, max_members, max_total_bytes, max_ratio)
        # Every path is checked before anything is written.
        paths = [_safe_path(archive, member.name) for member in members]
        writer = _Writer(archive, tmp, max_total_bytes, max_ratio)
        show = sys.stderr is not None and sys.stderr.isatty()
        for member, path in tqdm(
            list(zip(members, paths, strict=True)),
            desc=f"extracting {archive.name}",
            unit="file",
            disable=not show,
        ):
            if path is not None:
                writer.write(member, path)
    return dest
