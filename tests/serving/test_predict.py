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
