import io
import tarfile
import zipfile

import pytest

from stages.archive import ArchiveError, extract_archive

FILES = {"cats/a.png": b"cat picture", "dogs/b.png": b"dog picture"}


def make_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return path


def tar_member(name, content=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(content)
    return info, io.BytesIO(content) if content else None


def make_tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as bundle:
        for info, data in members:
            bundle.addfile(info, data)
    return path


def assert_nothing_written(tmp_path, dest):
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.fixture
def work(tmp_path):
    (tmp_path / "bundle").mkdir()
    return tmp_path


def test_zip_of_class_folders_extracts_and_skips_macos_metadata(work):
    archive = make_zip(work / "bundle" / "p.zip", {**FILES, "__MACOSX/cats/._a.png": b"junk"})
    dest = extract_archive(archive, work / "out")
    assert {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    } == FILES


def test_tar_gz_of_class_folders_extracts(work):
    archive = make_tar(work / "bundle" / "p.tar.gz", [tar_member(n, c) for n, c in FILES.items()])
    dest = extract_archive(archive, work / "out")
    assert (dest / "dogs" / "b.png").read_bytes() == b"dog picture"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.txt", "escapes the archive's folder"),
        ("cats/../../evil.txt", "escapes"),
        ("/tmp/evil.txt", "absolute path"),
        ("C:\\evil.txt", "absolute path"),
        ("..\\evil.txt", "escapes"),
    ],
)
def test_zip_members_leaving_the_destination_are_refused(work, name, message):
    archive = make_zip(work / "bundle" / "p.zip", {**FILES, name: b"owned"})
    with pytest.raises(ArchiveError, match=rf"p\.zip: member .*{message}"):
        extract_archive(archive, work / "out")
    assert_nothing_written(work, work / "out")


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tar_member("cats/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (tar_member("cats/hard.png", kind=tarfile.LNKTYPE, link="cats/a.png"), "is a link"),
        (tar_member("cats/pipe", kind=tarfile.FIFOTYPE), "is a device or fifo"),
        (tar_member("../../evil.txt", b"owned"), "escapes"),
    ],
)
def test_tar_links_devices_and_escapes_are_refused(work, member, message):
    members = [tar_member(n, c) for n, c in FILES.items()] + [member]
    archive = make_tar(work / "bundle" / "p.tar.gz", members)
    with pytest.raises(ArchiveError, match=message):
        extract_archive(archive, work / "out")
    assert_nothing_written(work, work / "out")


def test_zip_symlink_member_is_refused(work):
    archive = work / "bundle" / "p.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        link = zipfile.ZipInfo("cats/link.png")
        link.external_attr = 0o120777 << 16  # S_IFLNK
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match=r"cats/link\.png' is a link"):
        extract_archive(archive, work / "out")
    assert_nothing_written(work, work / "out")


def test_too_many_members_are_refused(work):
    archive = make_zip(work / "bundle" / "p.zip", {f"cats/{i}.png": b"x" for i in range(30)})
    with pytest.raises(ArchiveError, match="30 members, more than 10"):
        extract_archive(archive, work / "out", max_members=10)
    assert_nothing_written(work, work / "out")


def test_too_many_bytes_are_refused(work):
    archive = make_zip(work / "bundle" / "p.zip", FILES, compression=zipfile.ZIP_STORED)
    with pytest.raises(ArchiveError, match="unpacks to 22 bytes, more than 20"):
        extract_archive(archive, work / "out", max_total_bytes=20)
    assert_nothing_written(work, work / "out")


def test_zip_bomb_ratio_is_refused(work):
    archive = make_zip(work / "bundle" / "bomb.zip", {"cats/zeros.png": bytes(50 * 2**20)})
    assert archive.stat().st_size < 100_000
    with pytest.raises(ArchiveError, match=r"compression ratio \d+ is above 200"):
        extract_archive(archive, work / "out")
    assert_nothing_written(work, work / "out")


def test_a_file_that_is_not_an_archive_is_refused(work):
    archive = work / "bundle" / "photos.zip"
    archive.write_bytes(b"this is a text file")
    with pytest.raises(ArchiveError, match=r"photos\.zip: not a zip or tar archive"):
        extract_archive(archive, work / "out")


def test_truncated_archive_is_refused_as_corrupt(work):
    big = {f"cats/{i}.png": bytes(range(256)) * 40 for i in range(20)}
    whole = make_tar(work / "bundle" / "whole.tar.gz", [tar_member(n, c) for n, c in big.items()])
    cut = work / "bundle" / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        ArchiveError, match=r"cut\.tar\.gz: (corrupt or truncated|not a zip or tar)"
    ):
        extract_archive(cut, work / "out")
    assert not (work / "out").exists()
