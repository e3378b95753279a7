import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from classifier.config import DataParams
from classifier.data import sources
from classifier.data.dataset import read_image_set
from classifier.errors import DataError
from stages import download
from tests.helpers import make_image_folder, sha256_of_file, write_idx_files, zip_folder

DIGITS = DataParams(source="digits", path=None, mirrors=[], layout="auto")


def test_digits_source_writes_all_1797_digits_as_uint8(tmp_path):
    description = download.run(DIGITS, out_dir=tmp_path / "raw")
    assert description == {
        "source": "digits",
        "layout": "pool",
        "origin": "sklearn.datasets.load_digits",
    }
    loaded = read_image_set(tmp_path / "raw" / "pool")
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
    assert json.loads((tmp_path / "raw" / "source.json").read_text()) == description


def test_failed_download_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    download.run(DIGITS, out_dir=out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken_source(cfg, out):
        raise OSError("connection reset")

    monkeypatch.setitem(sources.SOURCES, "digits", broken_source)
    with pytest.raises(OSError, match="connection reset"):
        download.run(DIGITS, out_dir=out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def folder_params(path) -> DataParams:
    return DataParams(source="folder", path=str(path), mirrors=[], layout="auto")


def test_folder_source_copies_each_class_folder_and_skips_hidden_files(tmp_path):
    written = make_image_folder(tmp_path / "photos")
    description = download.run(folder_params(tmp_path / "photos"), out_dir=tmp_path / "raw")
    files = tmp_path / "raw" / "files"
    assert sorted(p.name for p in files.iterdir()) == ["cats", "dogs"]
    for name, expected in written.items():
        assert sorted(p.name for p in (files / name).iterdir()) == sorted(expected)
    assert description["layout"] == "files"
    assert description["files_per_class"] == {name: len(v) for name, v in written.items()}


def test_folder_with_a_single_class_is_a_clear_error(tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"at least 2 classes, found \['cats'\]"):
        download.run(folder_params(tmp_path / "photos"), out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_empty_class_folder_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "photos", per_class=2, broken=False)
    (tmp_path / "photos" / "birds").mkdir()
    with pytest.raises(DataError, match=r"birds: class folder 'birds' holds no files"):
        download.run(folder_params(tmp_path / "photos"), out_dir=tmp_path / "raw")


def assert_idx_splits(raw, arrays):
    for split in ("train", "test"):
        image_set = read_image_set(raw / split)
        np.testing.assert_array_equal(image_set.images[..., 0], arrays[f"{split}_images"])
        np.testing.assert_array_equal(image_set.labels, arrays[f"{split}_labels"])


@pytest.mark.parametrize("compress", [True, False])
def test_idx_dir_source_keeps_the_sources_own_test_split(tmp_path, compress):
    arrays = write_idx_files(tmp_path / "idx", compress=compress)
    cfg = DataParams(source="idx_dir", path=str(tmp_path / "idx"), mirrors=[], layout="auto")
    assert download.run(cfg, out_dir=tmp_path / "raw")["layout"] == "split"
    assert_idx_splits(tmp_path / "raw", arrays)
    assert read_image_set(tmp_path / "raw" / "test").class_names == tuple("0123456789")


def test_idx_dir_without_a_file_names_it(tmp_path):
    write_idx_files(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    cfg = DataParams(source="idx_dir", path=str(tmp_path / "idx"), mirrors=[], layout="auto")
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte\.gz"):
        download.run(cfg, out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_mnist_falls_back_from_a_missing_mirror_and_checks_every_file(
    tmp_path, http_server, monkeypatch
):
    base_url, served = http_server
    arrays = write_idx_files(served / "mnist")
    sums = {
        role: sha256_of_file(served / "mnist" / name) for role, name in sources.IDX_FILES.items()
    }
    dataset = sources.IdxDataset((f"{base_url}/mnist/",), sums, sources.DIGIT_NAMES)
    monkeypatch.setitem(sources.IDX_DATASETS, "mnist", dataset)
    # The mirror set in params comes first; it has nothing (404), so the next one serves.
    cfg = DataParams(source="mnist", path=None, mirrors=[f"{base_url}/empty/"], layout="auto")
    description = download.run(cfg, out_dir=tmp_path / "raw")
    assert description["mirrors"] == [f"{base_url}/empty/", f"{base_url}/mnist/"]
    assert_idx_splits(tmp_path / "raw", arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_mnist_with_wrong_checksums_names_url_and_file_and_leaves_nothing(
    tmp_path, http_server, monkeypatch
):
    from classifier.data.fetch import DownloadError

    base_url, served = http_server
    write_idx_files(served / "mnist")
    pinned = sources.IDX_DATASETS["mnist"]
    # The real pinned checksums, but only this mirror: these test files cannot match.
    monkeypatch.setitem(
        sources.IDX_DATASETS, "mnist", sources.IdxDataset((), pinned.sha256, pinned.class_names)
    )
    cfg = DataParams(source="mnist", path=None, mirrors=[f"{base_url}/mnist/"], layout="auto")
    url = f"{base_url}/mnist/train-images-idx3-ubyte.gz"
    with pytest.raises(DownloadError, match=rf"train-images-idx3-ubyte\.gz.*{url}.*sha256"):
        download.run(cfg, out_dir=tmp_path / "raw")
    assert list(tmp_path.iterdir()) == []


def test_archive_source_extracts_a_zip_of_class_folders_inside_a_top_folder(tmp_path):
    written = make_image_folder(tmp_path / "photos", per_class=3, broken=False)
    zip_folder(tmp_path / "photos", tmp_path / "pets.zip", top="PetImages")
    cfg = DataParams(source="archive", path=str(tmp_path / "pets.zip"), mirrors=[], layout="auto")
    description = download.run(cfg, out_dir=tmp_path / "raw")
    assert description["files_per_class"] == {"cats": 3, "dogs": 3}
    for name, expected in written.items():
        found = sorted(p.name for p in (tmp_path / "raw" / "files" / name).iterdir())
        assert found == sorted(expected)


def test_archive_source_downloads_a_tar_gz_from_a_url(tmp_path, http_server):
    import tarfile

    base_url, served = http_server
    make_image_folder(tmp_path / "photos", per_class=2, broken=False)
    with tarfile.open(served / "pets.tar.gz", "w:gz") as bundle:
        for name in ("cats", "dogs"):
            bundle.add(tmp_path / "photos" / name, arcname=name)
    cfg = DataParams(source="archive", path=f"{base_url}/pets.tar.gz", mirrors=[], layout="auto")
    assert download.run(cfg, out_dir=tmp_path / "raw")["files_per_class"] == {"cats": 2, "dogs": 2}


def test_archive_escaping_its_folder_is_refused_and_leaves_nothing(tmp_path):
    import zipfile

    from classifier.data.archive import ArchiveError

    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as bundle:
        bundle.writestr("cats/a.png", b"x")
        bundle.writestr("../../evil.txt", b"owned")
    cfg = DataParams(source="archive", path=str(tmp_path / "evil.zip"), mirrors=[], layout="auto")
    with pytest.raises(ArchiveError, match=r"evil\.zip.*\.\./\.\./evil\.txt"):
        download.run(cfg, out_dir=tmp_path / "work" / "raw")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert list((tmp_path / "work").iterdir()) == []


def test_links_inside_the_folder_are_followed_and_links_out_of_it_are_skipped_and_listed(
    tmp_path,
):
    photos = tmp_path / "photos"
    written = make_image_folder(photos, broken=False)
    outside = tmp_path / "elsewhere"
    (outside / "secrets").mkdir(parents=True)
    (outside / "secrets" / "passwords.png").write_bytes(b"not yours")
    (outside / "lone.png").write_bytes(b"not yours either")
    cat = written["cats"][0]
    (photos / "dogs" / "alias.png").symlink_to(photos / "cats" / cat)  # inside: followed
    (photos / "dogs" / "more").symlink_to(photos / "cats")  # a folder inside: followed
    (photos / "system").symlink_to(outside / "secrets")  # a class folder outside: skipped
    (photos / "cats" / "lone.png").symlink_to(outside / "lone.png")  # a file outside: skipped
    (photos / "cats" / "gone.png").symlink_to(photos / "nothing-here.png")  # dangling: skipped

    description = download.run(folder_params(photos), out_dir=tmp_path / "raw")
    files = tmp_path / "raw" / "files"
    assert sorted(p.name for p in files.iterdir()) == ["cats", "dogs"]
    assert (files / "dogs" / "alias.png").read_bytes() == (photos / "cats" / cat).read_bytes()
    assert sorted(p.name for p in (files / "dogs" / "more").iterdir()) == sorted(written["cats"])
    assert not list(files.rglob("lone.png")) and not list(files.rglob("passwords.png"))
    skipped = {link["link"]: link for link in description["skipped_links"]}
    # Each path a skipped link was met by is listed: dogs/more is cats, by a link.
    assert set(skipped) == {
        "system",
        "cats/lone.png",
        "cats/gone.png",
        "dogs/more/lone.png",
        "dogs/more/gone.png",
    }
    assert skipped["system"]["reason"] == "points outside the folder"
    assert skipped["cats/gone.png"]["reason"] == "points at nothing"
    assert description["files_per_class"] == {
        "cats": len(written["cats"]),
        "dogs": len(written["dogs"]) + 1 + len(written["cats"]),
    }


def test_a_loop_of_links_is_skipped_and_listed_not_a_traceback(tmp_path):
    photos = tmp_path / "photos"
    make_image_folder(photos, broken=False)
    (photos / "cats" / "l1").symlink_to("l2")
    (photos / "cats" / "l2").symlink_to("l1")
    (photos / "dogs" / "self").symlink_to("self")
    description = download.run(folder_params(photos), out_dir=tmp_path / "raw")
    skipped = {link["link"]: link["reason"] for link in description["skipped_links"]}
    assert skipped == {
        "cats/l1": "is a loop of links",
        "cats/l2": "is a loop of links",
        "dogs/self": "is a loop of links",
    }


def test_a_hidden_folder_beside_the_classes_is_listed_with_its_files(tmp_path, caplog):
    photos = tmp_path / "photos"
    written = make_image_folder(photos, broken=False)
    hidden = photos / ".hidden"
    hidden.mkdir()
    for name in written["cats"]:
        (hidden / name).write_bytes((photos / "cats" / name).read_bytes())
    with caplog.at_level("WARNING"):
        description = download.run(folder_params(photos), out_dir=tmp_path / "raw")
    assert description["skipped_folders"] == [
        {
            "folder": ".hidden",
            "files": str(len(written["cats"])),
            "reason": "hidden (its name starts with a dot)",
        }
    ]
    assert f"skipped folder .hidden with {len(written['cats'])} files" in caplog.text
    assert sorted(p.name for p in (tmp_path / "raw" / "files").iterdir()) == ["cats", "dogs"]


def test_a_relative_data_path_is_relative_to_the_project_also_in_dvcs_copies(tmp_path, monkeypatch):
    project = tmp_path / "project"
    written = make_image_folder(tmp_path / "photos", broken=False)
    copy = project / ".dvc" / "tmp" / "exps" / "tmpq1"  # where a queued experiment runs
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))  # as DVC sets it there, and in the workspace
    description = download.run(folder_params("../photos"), out_dir=copy / "raw")
    assert description["path"] == str(tmp_path / "photos")
    assert description["files_per_class"] == {name: len(files) for name, files in written.items()}
    monkeypatch.delenv("DVC_ROOT")  # a stage run by hand: relative to where it runs
    with pytest.raises(DataError, match="not a folder"):
        download.run(folder_params("../photos"), out_dir=copy / "raw2")
