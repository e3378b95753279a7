"""Safe extraction, on real archives built with zipfile and tarfile in tmp_path."""

import io
import os
import re
import stat
import tarfile
import zipfile

import pytest

import classifier.data.archive
from classifier.data.archive import ArchiveError, extract_archive
from tests.helpers import make_zip

FILES = {"cats/a.png": b"\x89PNG a cat", "dogs/b.png": b"\x89PNG a dog"}


def tar_member(name, content=b"", kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(content), mode
    return info, io.BytesIO(content) if content else None


def make_tar(path, members, mode="w:gz"):
    """A tar of ``members``: (TarInfo, file object) pairs."""
    with tarfile.open(path, mode) as bundle:
        for info, data in members:
            bundle.addfile(info, data)
    return path


def tar_of_files(path, files=FILES, mode="w:gz"):
    return make_tar(path, [tar_member(name, content) for name, content in files.items()], mode)


def tree(folder):
    """Every file under ``folder``: relative POSIX path -> content."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


class Workspace:
    """Archives in ``in/``, extraction to ``work/out``, and a check that refusals leave no trace."""

    def __init__(self, root):
        self.root = root
        self.archives = root / "in"
        self.archives.mkdir()
        self.dest = root / "work" / "out"
        self.dest.parent.mkdir()

    def snapshot(self):
        # The parent of tmp_path too: "../../../x" from the temporary folder lands there.
        return (
            sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")),
            sorted(os.listdir(self.root.parent)),
        )

    def refused(self, archive, match, **limits):
        """Extracting ``archive`` raises ArchiveError matching ``match`` and leaves no trace."""
        before = self.snapshot()
        with pytest.raises(ArchiveError, match=match) as failure:
            extract_archive(archive, self.dest, **limits)
        assert str(failure.value).startswith(f"{archive}: ")
        assert not self.dest.exists()
        assert self.snapshot() == before
        return failure.value


@pytest.fixture
def work(tmp_path):
    return Workspace(tmp_path)


def named(archive, member):
    """A regex for an error naming ``archive`` and ``member``."""
    return rf"^{re.escape(str(archive))}: member {re.escape(repr(member))} "


def test_zip_of_class_folders_extracts_with_directory_entries_skipping_macos_junk(work):
    members = {
        "cats/": b"",
        "dogs/": b"",
        **FILES,
        "__MACOSX/": b"",
        "__MACOSX/cats/._a.png": b"resource fork",
        "__MACOSX/cats/a.png": b"metadata",
        "dogs/._b.png": b"AppleDouble",
        "./": b"",
    }
    archive = make_zip(work.archives / "pets.zip", members)
    assert extract_archive(archive, work.dest) == work.dest
    assert tree(work.dest) == FILES
    assert sorted(p.name for p in work.dest.iterdir()) == ["cats", "dogs"]
    assert sorted(p.name for p in work.dest.parent.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("pets.tar", "w"),
        ("pets.tar.gz", "w:gz"),
        ("pets.tgz", "w:gz"),
        ("pets.tar.bz2", "w:bz2"),
        ("pets.tar.xz", "w:xz"),
    ],
)
def test_tar_of_class_folders_extracts(work, name, mode):
    members = [
        tar_member("pets", kind=tarfile.DIRTYPE, mode=0o755),
        *(tar_member(f"pets/{n}", c) for n, c in FILES.items()),
        tar_member("pets/cats/._a.png", b"AppleDouble"),
    ]
    archive = make_tar(work.archives / name, members, mode)
    extract_archive(archive, work.dest)
    assert tree(work.dest) == {f"pets/{n}": c for n, c in FILES.items()}


def test_kind_is_told_by_content_not_by_name(work):
    zip_named_tgz = make_zip(work.archives / "pets.tgz", FILES)
    tar_named_zip = tar_of_files(work.archives / "pets.zip")
    assert tree(extract_archive(zip_named_tgz, work.root / "a")) == FILES
    assert tree(extract_archive(tar_named_zip, work.root / "b")) == FILES


def test_extraction_replaces_what_was_at_dest(work):
    work.dest.mkdir()
    (work.dest / "stale.png").write_bytes(b"old")
    extract_archive(make_zip(work.archives / "pets.zip", FILES), work.dest)
    assert tree(work.dest) == FILES


def test_refused_archive_leaves_an_existing_dest_untouched(work):
    work.dest.mkdir()
    (work.dest / "good.png").write_bytes(b"keep me")
    archive = make_zip(work.archives / "evil.zip", {**FILES, "../evil.txt": b"owned"})
    with pytest.raises(ArchiveError):
        extract_archive(archive, work.dest)
    assert tree(work.dest) == {"good.png": b"keep me"}
    assert sorted(p.name for p in work.dest.parent.iterdir()) == ["out"]


def test_dotdot_that_stays_inside_is_normalised(work):
    archive = make_zip(work.archives / "pets.zip", {"cats/../dogs/./b.png": b"dog"})
    assert tree(extract_archive(archive, work.dest)) == {"dogs/b.png": b"dog"}


ESCAPES = [
    ("../evil.txt", "escapes the destination folder"),
    ("../../evil.txt", "escapes the destination folder"),
    ("../../../evil.txt", "escapes the destination folder"),
    ("cats/../../evil.txt", "escapes the destination folder"),
    ("..\\evil.txt", "escapes the destination folder"),
    ("cats\\..\\..\\evil.txt", "escapes the destination folder"),
    ("/tmp/evil", "has an absolute path"),
    ("C:\\evil.txt", "has an absolute path"),
    ("C:evil.txt", "has an absolute path"),
    ("\\\\server\\share\\evil.txt", "has an absolute path"),
]


@pytest.mark.parametrize(("member", "message"), ESCAPES)
def test_zip_members_leaving_the_destination_are_refused(work, member, message):
    archive = make_zip(work.archives / "evil.zip", {**FILES, member: b"owned"})
    work.refused(archive, named(archive, member) + message)


def test_zip_member_with_an_absolute_path_into_the_test_folder_is_refused(work):
    member = str(work.root / "evil.txt")  # were it written, the snapshot would show it
    archive = make_zip(work.archives / "evil.zip", {**FILES, member: b"owned"})
    work.refused(archive, named(archive, member) + "has an absolute path")


@pytest.mark.parametrize(("member", "message"), ESCAPES[:4] + ESCAPES[6:7])
def test_tar_members_leaving_the_destination_are_refused(work, member, message):
    members = [tar_member(n, c) for n, c in FILES.items()] + [tar_member(member, b"owned")]
    archive = make_tar(work.archives / "evil.tar.gz", members)
    work.refused(archive, named(archive, member) + message)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tar_member("cats/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a symbolic"),
        (tar_member("cats/link.png", kind=tarfile.SYMTYPE, link="a.png"), "is a symbolic link"),
        (tar_member("cats/hard.png", kind=tarfile.LNKTYPE, link="cats/a.png"), "is a hard link"),
        (tar_member("cats/pipe", kind=tarfile.FIFOTYPE), "is a device or fifo"),
        (tar_member("cats/tty", kind=tarfile.CHRTYPE), "is a device or fifo"),
        (tar_member("cats/disk", kind=tarfile.BLKTYPE), "is a device or fifo"),
    ],
    ids=["symlink out", "symlink in", "hardlink", "fifo", "char device", "block device"],
)
def test_tar_links_devices_and_fifos_are_refused(work, member, message):
    members = [tar_member(n, c) for n, c in FILES.items()] + [member]
    archive = make_tar(work.archives / "evil.tar.gz", members)
    work.refused(archive, named(archive, member[0].name) + message)


def test_tar_member_modes_are_not_kept(work):
    members = [tar_member("cats/a.png", b"x", mode=0o6777)]
    extract_archive(make_tar(work.archives / "pets.tar", members, "w"), work.dest)
    mode = (work.dest / "cats" / "a.png").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IXUSR)


def zip_info(name, file_type):
    info = zipfile.ZipInfo(name)
    info.external_attr = (file_type | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("file_type", "message"),
    [(stat.S_IFLNK, "is a symbolic link"), (stat.S_IFIFO, "is a device or fifo")],
)
def test_zip_links_and_fifos_are_refused(work, file_type, message):
    archive = work.archives / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("cats/a.png", b"cat")
        bundle.writestr(zip_info("cats/link.png", file_type), "/etc/passwd")
    work.refused(archive, named(archive, "cats/link.png") + message)


def test_encrypted_zip_member_is_refused(work):
    # zipfile cannot encrypt, so set the "encrypted" flag bit in the local and central headers.
    content = bytearray(make_zip(work.archives / "locked.zip", {"cats/a.png": b"x"}).read_bytes())
    for signature, flags_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        content[content.index(signature) + flags_offset] |= 0x1
    archive = work.archives / "locked.zip"
    archive.write_bytes(bytes(content))
    with zipfile.ZipFile(archive) as bundle, pytest.raises(RuntimeError, match="encrypted"):
        bundle.read("cats/a.png")  # what extraction would run into unchecked
    work.refused(archive, named(archive, "cats/a.png") + "is encrypted")


def test_member_clashing_with_another_is_refused(work):
    archive = make_zip(work.archives / "clash.zip", {"cats": b"a file", "cats/a.png": b"cat"})
    work.refused(archive, named(archive, "cats/a.png") + "clashes with another member")


def test_too_many_zip_members_are_refused(work):
    archive = make_zip(work.archives / "p.zip", {f"cats/{i}.png": b"x" for i in range(30)})
    work.refused(archive, r"more than 10 members \(member 'cats/10\.png'\)", max_members=10)
    assert tree(extract_archive(archive, work.dest, max_members=30))["cats/29.png"] == b"x"


def test_too_many_tar_members_are_refused(work):
    archive = tar_of_files(work.archives / "p.tgz", {f"cats/{i}.png": b"x" for i in range(30)})
    work.refused(archive, r"more than 10 members \(member 'cats/10\.png'\)", max_members=10)


def uncompressed_archive(work, kind, files):
    """``files`` in a stored zip or a plain tar, so declared sizes equal bytes written."""
    if kind == "zip":
        return make_zip(work.archives / "p.zip", files, zipfile.ZIP_STORED)
    return tar_of_files(work.archives / "p.tar", files, "w")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_declared_bytes_are_refused(work, kind):
    files = {"cats/a.png": bytes(15), "dogs/b.png": bytes(15)}
    archive = uncompressed_archive(work, kind, files)
    work.refused(
        archive,
        named(archive, "dogs/b.png") + "takes the declared size to 30 bytes, more than 20",
        max_total_bytes=20,
    )
    assert tree(extract_archive(archive, work.dest, max_total_bytes=30)) == files


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_bytes_are_counted_while_extracting_too(work, kind, monkeypatch):
    # zipfile and tarfile stop at the declared sizes, so lying headers cannot be built here;
    # switching the declared check off shows the count of bytes written holds on its own.
    monkeypatch.setattr(classifier.data.archive, "_check_declared", lambda *args: None)
    files = {"cats/a.png": bytes(15), "dogs/b.png": bytes(15)}
    archive = uncompressed_archive(work, kind, files)
    work.refused(
        archive,
        named(archive, "dogs/b.png") + "unpacks past the 20-byte limit",
        max_total_bytes=20,
    )


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_high_compression_ratio_bomb_is_refused(work, kind):
    zeros = {"cats/zeros.png": bytes(50 * 2**20)}
    if kind == "zip":
        archive = make_zip(work.archives / "bomb.zip", zeros)
    else:
        archive = tar_of_files(work.archives / "bomb.tar.gz", zeros)
    assert archive.stat().st_size < 100_000
    work.refused(
        archive,
        r"compression ratio \d+ is above 200: 52428800 bytes from \d+, "
        r"largest member 'cats/zeros\.png'",
    )


def test_a_file_that_is_not_an_archive_is_refused(work):
    archive = work.archives / "photos.zip"
    archive.write_bytes(b"this is a text file\n" * 100)
    work.refused(archive, r"photos\.zip: not a zip or tar archive$")


def test_a_gzip_without_a_tar_inside_is_refused(work):
    import gzip

    archive = work.archives / "photos.tar.gz"
    archive.write_bytes(gzip.compress(b"just some text\n" * 100))
    work.refused(archive, r"photos\.tar\.gz: corrupt or truncated archive \(gzip without a tar")


def test_a_missing_archive_is_refused(work):
    work.refused(work.archives / "nothing.zip", r"nothing\.zip: no such file$")


def big_files(count=20):
    return {f"cats/{i:02d}.png": os.urandom(10_000) for i in range(count)}


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("cut.zip", lambda path: make_zip(path, big_files()), "corrupt or truncated zip archive"),
        ("cut.tar.gz", lambda path: tar_of_files(path, big_files()), "corrupt or truncated"),
        (
            "cut.tar",
            lambda path: tar_of_files(path, big_files(), "w"),
            "corrupt or truncated archive: unexpected end of data",
        ),
    ],
)
def test_truncated_archives_are_refused_as_corrupt(work, name, make, message):
    whole = make(work.root / name)
    archive = work.archives / name
    archive.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    work.refused(archive, rf"{re.escape(name)}: {message}")


def test_damaged_member_data_is_refused_and_what_was_written_is_removed(work):
    files = {"cats/a.png": b"first member, fine", "dogs/b.png": b"second member " * 100}
    archive = make_zip(work.archives / "damaged.zip", files, zipfile.ZIP_STORED)
    content = archive.read_bytes()
    offset = content.index(b"second member ") + 50
    archive.write_bytes(content[:offset] + b"X" + content[offset + 1 :])
    work.refused(archive, r"corrupt or truncated archive in member 'dogs/b\.png': Bad CRC-32")
