import json

import numpy as np
import pytest
from PIL import Image

from classifier.data.dataset import read_image_set
from classifier.model.files import load_model
from tools import predict


@pytest.fixture
def pictures(trained, tmp_path):
    """Eight test digits saved as PNG files, as a person would have them, plus their arrays."""
    test = read_image_set(trained.data_dir / "test")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index in range(8):
        Image.fromarray(test.images[index][..., 0]).save(folder / f"digit_{index}.png")
    return folder, test.images[:8]


def run_main(trained, *targets, labels=None):
    return predict.main(
        [
            *map(str, targets),
            "--model",
            str(trained.model_path),
            "--labels",
            str(labels or trained.data_dir / "classes.json"),
        ]
    )


def test_prints_the_models_class_and_confidence_for_each_image(trained, pictures, capsys):
    folder, arrays = pictures
    assert run_main(trained, folder) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    probabilities = load_model(str(trained.model_path)).predict(arrays, verbose=0)
    class_names = json.loads((trained.data_dir / "classes.json").read_text())
    assert [path for path, _, _ in lines] == [str(folder / f"digit_{i}.png") for i in range(8)]
    assert [name for _, name, _ in lines] == [class_names[i] for i in probabilities.argmax(1)]
    np.testing.assert_allclose([float(c) for _, _, c in lines], probabilities.max(1), atol=1e-4)


def test_files_that_are_not_images_get_a_line_each_and_exit_code_1(trained, pictures, capsys):
    folder, _ = pictures
    (folder / "notes.txt").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    assert run_main(trained, folder) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 8
    assert captured.err.splitlines() == [
        f"predict: error: {folder / 'empty.png'}: empty file",
        f"predict: error: {folder / 'notes.txt'}: not an image",
    ]


def test_a_missing_path_is_one_clear_error(trained, tmp_path, capsys):
    assert run_main(trained, tmp_path / "nowhere.png") == 1
    assert (
        capsys.readouterr().err
        == f"predict: error: {tmp_path / 'nowhere.png'}: no such file or folder\n"
    )


def test_labels_that_do_not_match_the_model_are_refused(trained, pictures, tmp_path, capsys):
    labels = tmp_path / "classes.json"
    labels.write_text(json.dumps(["cat", "dog"]))
    assert run_main(trained, pictures[0], labels=labels) == 1
    assert "the model predicts 10 classes but the labels file names 2" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "kind"), [("7", "int"), ('{"0": "zero"}', "dict")])
def test_a_labels_file_that_is_not_a_list_of_names_is_one_error(
    trained, pictures, tmp_path, capsys, content, kind
):
    labels = tmp_path / "classes.json"
    labels.write_text(content)
    assert run_main(trained, pictures[0], labels=labels) == 1
    assert capsys.readouterr().err == (
        f"predict: error: {labels}: expected a JSON list of class names, got {kind}\n"
    )


def test_names_with_tabs_or_newlines_stay_one_line_each_quoted_as_json(trained, pictures, capsys):
    folder, _ = pictures
    odd = folder / "a\tb\nc.png"
    (folder / "digit_0.png").rename(odd)
    assert run_main(trained, odd, folder / "digit_1.png") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    fields = lines[0].split("\t")
    assert len(fields) == 3 and json.loads(fields[0]) == str(odd)
    assert lines[1].split("\t")[0] == str(folder / "digit_1.png")  # plain names stay plain


def test_json_output_is_one_object_per_image(trained, pictures, capsys):
    folder, arrays = pictures
    assert predict.main([str(folder), "--json", "--model", str(trained.model_path),
                         "--labels", str(trained.data_dir / "classes.json")]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probabilities = load_model(str(trained.model_path)).predict(arrays, verbose=0)
    assert [row["path"] for row in rows] == [str(folder / f"digit_{i}.png") for i in range(8)]
    assert [row["class_name"] for row in rows] == [str(i) for i in probabilities.argmax(1)]
    np.testing.assert_allclose([row["confidence"] for row in rows], probabilities.max(1), atol=1e-5)
