import subprocess
import sys

import pytest
import yaml

from classifier.config import load_params, parse_params
from classifier.errors import ParamsError
from tests.helpers import PROJECT_ROOT


def raw_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def test_project_params_yaml_is_valid_and_defaults_to_reference_cnn():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.data.source == "digits"
    assert params.train.architecture == "reference_cnn"
    assert (params.preprocess.image_height, params.preprocess.image_width) == (28, 28)


def test_unknown_key_is_named_with_the_file():
    raw = raw_params()
    raw["train"]["epocs"] = 3
    with pytest.raises(ParamsError, match=r"^params\.yaml: train\.epocs: unknown key$"):
        parse_params(raw)


def test_unknown_section_is_named():
    raw = raw_params()
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ParamsError, match=r"trian: unknown key"):
        parse_params(raw)


def test_missing_key_is_named():
    raw = raw_params()
    del raw["preprocess"]["seed"]
    with pytest.raises(ParamsError, match=r"preprocess\.seed: missing key"):
        parse_params(raw)


def test_out_of_range_value_is_named_with_what_was_given():
    raw = raw_params()
    raw["train"]["epochs"] = 0
    with pytest.raises(ParamsError, match=r"train\.epochs: .*greater than or equal to 1, got 0"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "epochs", "10"), ("train", "batch_size", True), ("preprocess", "channels", 2)],
)
def test_mistyped_value_is_rejected(section, key, value):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=rf"{section}\.{key}: .*got {value!r}"):
        parse_params(raw)


def test_held_out_fractions_must_leave_training_data():
    raw = raw_params()
    raw["preprocess"]["val_fraction"] = 0.45
    raw["preprocess"]["test_fraction"] = 0.45
    with pytest.raises(ParamsError, match=r"val_fraction \+ preprocess\.test_fraction must be"):
        parse_params(raw)


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [epochs: 3\n")
    with pytest.raises(ParamsError, match=rf"^{broken}: not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match=r"nowhere\.yaml: file not found"):
        load_params(tmp_path / "nowhere.yaml")


def test_flat_lists_every_param_under_a_dotted_key():
    params = load_params(PROJECT_ROOT / "params.yaml")
    flat = params.flat()
    expected = {f"{s}.{k}" for s, values in raw_params().items() for k in values}
    assert set(flat) == expected
    assert flat["train.epochs"] == params.train.epochs


def test_stage_reports_bad_params_in_one_line_and_exits_nonzero(tmp_path):
    raw = raw_params()
    raw["data"]["sorce"] = "digits"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.download",
            "--params",
            str(bad),
            "--out",
            str(tmp_path / "raw"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"download: error: {bad}: data.sorce: unknown key"
    assert not (tmp_path / "raw").exists()


def test_a_number_written_with_an_exponent_is_a_number(tmp_path):
    text = (PROJECT_ROOT / "params.yaml").read_text()
    edited = text.replace("learning_rate: 0.001", "learning_rate: 1e-3", 1)
    assert edited != text
    (tmp_path / "params.yaml").write_text(edited)
    assert load_params(tmp_path / "params.yaml").train.learning_rate == 0.001


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 32\n  epochs: 5\n")
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert str(raised.value) == (
        f"{path}: line 4: key 'epochs' is given twice (first on line 2); keep one"
    )


def test_a_params_file_that_is_not_utf8_is_one_error_naming_the_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((PROJECT_ROOT / "params.yaml").read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: not UTF-8 text \(byte 0xe9 at offset"):
        load_params(path)
