"""Image sets as people download them: split into train/ and test/ folders, or labelled in a
CSV file beside the images. Each read through download, then preprocess."""

from __future__ import annotations

import json

import pytest

from classifier.config import DataParams
from classifier.data.dataset import read_image_set
from classifier.errors import DataError
from stages import download, preprocess
from tests.helpers import make_image_folder, project_params


def source(kind: str, path, layout: str = "auto") -> DataParams:
    return DataParams(source=kind, path=str(path), mirrors=[], layout=layout)


def prepare(tmp_path, cfg: DataParams, **preprocess_values) -> dict:
    download.run(cfg, out_dir=tmp_path / "raw")
    values = {"image_height": 16, "image_width": 16, "channels": 1, **preprocess_values}
    preprocess.run(
        project_params(preprocess=values).preprocess,
        raw_dir=tmp_path / "raw",
        out_dir=tmp_path / "prepared",
        metrics_path=tmp_path / "data.json",
        report_path=tmp_path / "data.md",
    )
    return json.loads((tmp_path / "data.json").read_text())


def split_folder(root, splits=("train", "test"), per_class=None) -> dict[str, dict]:
    """``root/<split>/{cats,dogs}/`` for each split; the files written, by split."""
    per_class = per_class or {"train": 12, "test": 5, "val": 4, "valid": 4, "validation": 4}
    return {
        split: make_image_folder(root / split, per_class=per_class[split], broken=False, seed=i)
        for i, split in enumerate(splits)
    }


def test_train_and_test_folders_are_the_sources_own_splits_not_two_classes(tmp_path):
    written = split_folder(tmp_path / "photos")
    metrics = prepare(tmp_path, source("folder", tmp_path / "photos"))
    raw = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert raw["layout"] == "split_files" and raw["splits"] == {"train": "train", "test": "test"}
    prepared = {s: read_image_set(tmp_path / "prepared" / s) for s in ("train", "val", "test")}
    assert prepared["train"].class_names == ("cats", "dogs")  # not ("test", "train")
    # The given test split is kept whole; validation is carved out of train.
    assert metrics["images"]["test"] == 2 * 5
    assert metrics["images"]["train"] + metrics["images"]["val"] == 2 * 12
    assert metrics["images"]["val"] > 0
    origins = (tmp_path / "data.md").read_text()
    assert "Source: `folder` (split_files layout)" in origins
    assert sorted(written["test"]) == ["cats", "dogs"]


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_a_given_validation_folder_is_kept_as_the_validation_split(tmp_path, val_name):
    split_folder(tmp_path / "photos", ("train", val_name, "test"))
    metrics = prepare(tmp_path, source("folder", tmp_path / "photos"))
    assert metrics["images"] == {"train": 24, "val": 8, "test": 10}


def test_split_folders_with_other_classes_stop_naming_the_difference(tmp_path):
    split_folder(tmp_path / "photos")
    (tmp_path / "photos" / "test" / "dogs").rename(tmp_path / "photos" / "test" / "wolves")
    with pytest.raises(DataError) as stopped:
        download.run(source("folder", tmp_path / "photos"), out_dir=tmp_path / "raw")
    assert "the test split lacks ['dogs'] and has ['wolves'], not train; every split folder" in (
        str(stopped.value)
    )
    assert not (tmp_path / "raw").exists()


def test_layout_classes_reads_train_and_test_as_two_classes_when_asked(tmp_path):
    split_folder(tmp_path / "photos")
    download.run(source("folder", tmp_path / "photos", "classes"), out_dir=tmp_path / "raw")
    raw = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert raw["layout"] == "files" and raw["files_per_class"] == {"test": 10, "train": 24}


def test_layout_splits_on_a_folder_of_classes_stops_in_one_line(tmp_path):
    make_image_folder(tmp_path / "photos", broken=False)
    with pytest.raises(DataError, match=r"data.layout is splits, but the top folders of .* are "):
        download.run(source("folder", tmp_path / "photos", "splits"), out_dir=tmp_path / "raw")


def test_a_training_photo_copied_into_test_is_reported_and_dropped_when_asked(tmp_path):
    written = split_folder(tmp_path / "photos")
    copied = written["train"]["cats"][0]
    (tmp_path / "photos" / "test" / "cats" / f"copy-{copied}").write_bytes(
        (tmp_path / "photos" / "train" / "cats" / copied).read_bytes()
    )
    kept = prepare(tmp_path, source("folder", tmp_path / "photos"))
    assert kept["train_dropped_duplicating_test"] == 0 and kept["duplicates_across_splits"] == 1
    dropped = prepare(
        tmp_path / "again", source("folder", tmp_path / "photos"),
        drop_test_duplicates_from_train=True,
    )  # fmt: skip
    assert dropped["train_dropped_duplicating_test"] == 1
    assert dropped["duplicates_across_splits"] == 0


def write_labelled(folder, rows: list[str], name: str = "labels.csv", header="filename,label"):
    """Images of two classes in one folder, and a CSV of ``rows`` naming their labels."""
    written = make_image_folder(folder / "pool", per_class=6, broken=False)
    flat = folder / "images"
    flat.mkdir()
    for label, files in written.items():
        for file in files:
            (flat / f"{label}-{file}").write_bytes((folder / "pool" / label / file).read_bytes())
    lines = [f"images/{label}-{file},{label}" for label, files in written.items() for file in files]
    (folder / name).write_text("\n".join([header, *lines, *rows]) + "\n")
    return written


def test_a_csv_source_reads_labels_and_reports_rows_it_cannot_use(tmp_path):
    folder = tmp_path / "kaggle"
    written = write_labelled(
        folder,
        [
            "images/missing.png,cats",  # no such file
            "images/cats-x.png,",  # no label
            "images/dogs-nothing.png,cats",  # no such file either
            "../outside.png,dogs",  # outside the folder
        ],
    )
    first_cat = f"images/cats-{written['cats'][0]}"
    with (folder / "labels.csv").open("a") as table:
        table.write(f"{first_cat},dogs\n")  # listed twice: the first row wins
    (tmp_path / "outside.png").write_bytes(b"x")
    metrics = prepare(tmp_path, source("csv", folder))
    raw = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert raw["labels_file"] == "labels.csv"
    assert raw["files_per_class"] == {"cats": 6, "dogs": 6}
    reasons = {row["file"]: row["reason"] for row in raw["skipped_rows"]}
    assert reasons["images/missing.png"].endswith("line 14: no such file")
    assert reasons["images/cats-x.png"].endswith("line 15: no label")
    assert reasons["../outside.png"].endswith("the file is outside the folder")
    assert reasons[first_cat] == "labels.csv line 18: the file is listed again (first on line 2)"
    assert metrics["skipped_files"] == 5
    report = (tmp_path / "data.md").read_text()
    assert "labels.csv line 14: no such file" in report
    prepared = read_image_set(tmp_path / "prepared" / "train")
    assert prepared.class_names == ("cats", "dogs")


def test_hugging_face_metadata_csv_is_read_too(tmp_path):
    write_labelled(tmp_path / "hf", [], name="metadata.csv", header="file_name,label")
    download.run(source("csv", tmp_path / "hf"), out_dir=tmp_path / "raw")
    raw = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert raw["labels_file"] == "metadata.csv" and raw["files_per_class"]["dogs"] == 6


def test_a_csv_without_its_columns_is_one_line_naming_them(tmp_path):
    write_labelled(tmp_path / "bad", [], header="path,class")
    with pytest.raises(DataError, match=r"expected the columns filename,label; found \['path'"):
        download.run(source("csv", tmp_path / "bad"), out_dir=tmp_path / "raw")
