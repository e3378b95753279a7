"""exclude.yaml: a person's decisions about images, by content hash, applied by preprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classifier.data.dataset import SPLITS, ImageSet, read_image_set
from classifier.data.duplicates import image_hashes
from classifier.data.exclude import apply_exclusions, read_exclusions
from classifier.errors import DataError
from stages import preprocess
from tests.helpers import PROJECT_ROOT, project_params, write_raw_pool

HASH_A, HASH_B = '"' + "0" * 24 + '"', "ab" * 12  # quoted: YAML reads digits as a number


def test_the_projects_exclude_file_is_empty_and_valid():
    assert read_exclusions(PROJECT_ROOT / "exclude.yaml") == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("- {hash: 12ab, action: drop}", r"images\[0\]: hash must be the 24 hex digits"),
        (f"- {{hash: {HASH_A}, action: delete}}", r"images\[0\]: action must be drop or relabel"),
        (f"- {{hash: {HASH_A}, action: relabel}}", r"images\[0\]: relabel needs a label"),
        (f"- {{hash: {HASH_A}, action: drop, label: '3'}}", r"images\[0\]: drop takes no label"),
        (f"- {{hash: {HASH_A}, action: drop, why: x}}", r"images\[0\]: unknown key\(s\) \['why'\]"),
        (
            f"- {{hash: {HASH_A}, action: drop}}\n- {{hash: {HASH_A}, action: drop}}",
            r"images\[1\] repeats the hash of images\[0\]",
        ),
        ("- just a line", r"images\[0\]: expected a mapping"),
        (f"- {{hash: {'0' * 24}, action: drop}}", r"images\[0\]: hash must be a quoted string"),
    ],
)
def test_a_wrong_entry_is_an_error_naming_the_file_and_the_entry(tmp_path, entries, message):
    path = tmp_path / "exclude.yaml"
    path.write_text(f"images:\n{entries}\n")
    with pytest.raises(DataError, match=rf"exclude\.yaml: {message}"):
        read_exclusions(path)


def image_set(values: list[int], labels: list[int]) -> ImageSet:
    images = np.array(values, np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    return ImageSet(images, np.array(labels, np.int64), ("a", "b", "c"))


def test_drop_and_relabel_apply_to_every_copy_in_every_split(tmp_path):
    splits = {
        "train": image_set([1, 2, 3, 2], [0, 1, 2, 1]),
        "val": image_set([4, 5], [0, 1]),
        "test": image_set([2, 6], [1, 2]),
    }
    hash_of = {value: image_hashes(image_set([value], [0]).images)[0] for value in range(7)}
    path = tmp_path / "exclude.yaml"
    path.write_text(
        "images:\n"
        f"  - {{hash: {hash_of[2]}, action: drop, note: a smudge}}\n"
        f"  - {{hash: {hash_of[5]}, action: relabel, label: c}}\n"
        f"  - {{hash: {HASH_B}, action: drop}}\n"
    )
    cleaned, counts = apply_exclusions(splits, read_exclusions(path))
    assert counts == {"dropped": 3, "relabelled": 1, "unmatched_entries": 1}
    assert cleaned["train"].images[:, 0, 0, 0].tolist() == [1, 3]
    assert cleaned["train"].labels.tolist() == [0, 2]
    assert cleaned["val"].labels.tolist() == [0, 2]  # image 5: b -> c
    assert cleaned["test"].images[:, 0, 0, 0].tolist() == [6]


def test_relabelling_to_a_class_that_does_not_exist_is_an_error(tmp_path):
    splits = {split: image_set([1], [0]) for split in SPLITS}
    path = tmp_path / "exclude.yaml"
    path.write_text(f"images:\n  - {{hash: {HASH_A}, action: relabel, label: z}}\n")
    with pytest.raises(DataError, match=r"to 'z', which is not a class; the classes are"):
        apply_exclusions(splits, read_exclusions(path))


def test_preprocess_applies_exclude_yaml_after_the_split_so_no_other_image_moves(tmp_path):
    rng = np.random.default_rng(0)
    pool = ImageSet(
        rng.integers(0, 256, (120, 28, 28, 1)).astype(np.uint8),
        np.arange(120) % 3,
        ("a", "b", "c"),
    )
    write_raw_pool(tmp_path / "raw", pool)
    cfg = project_params().preprocess

    def prepare(name: str, exclude: str | None) -> dict[str, ImageSet]:
        exclude_path = None
        if exclude is not None:
            exclude_path = tmp_path / f"{name}.yaml"
            exclude_path.write_text(exclude)
        preprocess.run(
            cfg,
            raw_dir=tmp_path / "raw",
            out_dir=tmp_path / name,
            metrics_path=tmp_path / f"{name}.json",
            report_path=tmp_path / f"{name}.md",
            exclude_path=exclude_path,
        )
        return {split: read_image_set(tmp_path / name / split) for split in SPLITS}

    before = prepare("before", None)
    dropped, relabelled = image_hashes(before["train"].images[:1])[0], before["test"]
    relabel_hash = image_hashes(relabelled.images[:1])[0]
    new_label = ("b", "c", "a")[relabelled.labels[0]]
    after = prepare(
        "after",
        "images:\n"
        f"  - {{hash: {dropped}, action: drop}}\n"
        f"  - {{hash: {relabel_hash}, action: relabel, label: {new_label}}}\n",
    )
    np.testing.assert_array_equal(after["train"].images, before["train"].images[1:])
    np.testing.assert_array_equal(after["val"].images, before["val"].images)
    np.testing.assert_array_equal(after["test"].images, before["test"].images)
    assert after["test"].labels[0] == ("a", "b", "c").index(new_label)
    np.testing.assert_array_equal(after["test"].labels[1:], before["test"].labels[1:])
    metrics = json.loads((tmp_path / "after.json").read_text())
    assert metrics["excluded"] == {"dropped": 1, "relabelled": 1, "unmatched_entries": 0}
    assert "1 images dropped, 1 relabelled" in (tmp_path / "after.md").read_text()
