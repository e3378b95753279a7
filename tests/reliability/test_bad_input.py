"""Bad params and bad data: each stops its stage with one line and exit 1, writing nothing."""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import yaml

from classifier.config import DataParams
from classifier.data import sources
from stages import download, preprocess
from tests.helpers import (
    PROJECT_ROOT,
    TOOLS,
    ScriptedServer,
    failed_in_one_line,
    leftovers,
    make_image_folder,
    make_zip,
    one_line_error,
    project_params,
    run_cli,
    sha256_of_file,
    snapshot,
    stage_env,
    write_idx_files,
    write_params,
    zip_folder,
)

DIGITS = DataParams(source="digits", path=None, mirrors=[], layout="auto")


def raw_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def params_file(tmp_path, edit):
    """params.yaml as ``edit(raw)`` leaves it (or the text it returns) in ``tmp_path``."""
    raw = raw_params()
    text = edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


BAD_PARAMS = {
    "unknown key": (lambda raw: raw["train"].update(epocs=3), r"train\.epocs: unknown key"),
    "missing key": (lambda raw: raw["preprocess"].pop("seed"), r"preprocess\.seed: missing key"),
    "wrong type": (
        lambda raw: raw["train"].update(batch_size="32"),
        r"train\.batch_size: input should be a valid integer, got '32'",
    ),
    "out of range": (
        lambda raw: raw["preprocess"].update(val_fraction=0.7),
        r"preprocess\.val_fraction: input should be less than 0\.5, got 0\.7",
    ),
    "not yaml": (lambda raw: "train: [epochs: 3\n", r"not valid YAML: .*line 1"),
    "not a mapping": (lambda raw: "just some words\n", r"expected a mapping of sections, got str"),
    "key given twice": (
        lambda raw: "train:\n  epochs: 3\n  epochs: 4\n",
        r"line 3: key 'epochs' is given twice \(first on line 2\); keep one",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_download_cli_names_file_and_key_of_bad_params_and_writes_nothing(tmp_path, case):
    edit, message = BAD_PARAMS[case]
    params = params_file(tmp_path, edit)
    done = run_cli("download", "--params", params, "--out", tmp_path / "data" / "raw")
    error = failed_in_one_line(done, "download")
    assert error.startswith(f"{params}: ")
    assert re.search(message, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_download_cli_names_a_params_file_that_is_not_utf8_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes((PROJECT_ROOT / "params.yaml").read_bytes().replace(b"digits", b"d\xefgits"))
    done = run_cli("download", "--params", params, "--out", tmp_path / "data" / "raw")
    error = failed_in_one_line(done, "download")
    assert error.startswith(f"{params}: not UTF-8 text (byte 0xef at offset ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_log_level_that_does_not_exist_is_one_line_naming_it(tmp_path):
    done = run_cli("download", "--out", tmp_path / "raw", env=stage_env(LOG_LEVEL="garbage"))
    error = failed_in_one_line(done, "download")
    assert error == (
        "LOG_LEVEL: unknown level 'GARBAGE', expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )
    assert not (tmp_path / "raw").exists()


def test_download_cli_names_a_missing_params_file_and_writes_nothing(tmp_path):
    done = run_cli("download", "--params", tmp_path / "nowhere.yaml", "--out", tmp_path / "raw")
    assert failed_in_one_line(done, "download") == f"{tmp_path / 'nowhere.yaml'}: file not found"
    assert list(tmp_path.iterdir()) == []


# Every path a stage writes or reads, under the test's folder, so nothing lands in the project.
STAGE_PATHS = {
    "preprocess": "--raw raw --out prepared --metrics data.json --report data.md",
    "train": "--data prepared --model model.keras --history history.csv --metrics train.json "
    "--run-info run.json --data-report data.md --checkpoint checkpoint",
    "evaluate": "--data prepared --model model.keras --run-info run.json --history history.csv "
    "--metrics evaluate.json --plots plots",
    "export": "--data prepared --model model.keras --run-info run.json --formats formats "
    "--format-metrics formats.json --out registered.json --decision promotion.json",
    "predict": "image.png --model model.keras --labels classes.json",
}


@pytest.mark.parametrize(
    "stage",
    [stage for stage in STAGE_PATHS],
)
def test_every_stage_reports_bad_params_in_one_line(tmp_path, capsys, stage):
    (tmp_path / "classes.json").write_text('["a", "b"]')
    params = params_file(tmp_path, BAD_PARAMS["unknown key"][0])
    argv = [
        arg if arg.startswith("--") else str(tmp_path / arg) for arg in STAGE_PATHS[stage].split()
    ]
    package = "tools" if stage in TOOLS else "stages"
    code = importlib.import_module(f"{package}.{stage}").main(["--params", str(params), *argv])
    assert code == 1
    error = one_line_error(capsys.readouterr().err, stage)
    assert error == f"{params}: train.epocs: unknown key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.json", "params.yaml"]


# --- bad data from the data stage -------------------------------------------------------


@pytest.fixture
def previous_raw(tmp_path):
    """A good data/raw from an earlier download, and its files, to compare after a failure."""
    out = tmp_path / "data" / "raw"
    download.run(DIGITS, out_dir=out)
    return out, snapshot(out)


def served_mnist(monkeypatch, sums, **fetch_options):
    """Make ``mnist`` mean only the given mirror and checksums (no real network)."""
    from classifier.data import fetch

    monkeypatch.setitem(
        sources.IDX_DATASETS, "mnist", sources.IdxDataset((), sums, sources.DIGIT_NAMES)
    )
    if fetch_options:
        quick = functools.partial(fetch.download_file, **fetch_options)
        monkeypatch.setattr(fetch, "download_file", quick)


def test_corrupt_download_fails_on_its_checksum_and_keeps_the_previous_raw_data(
    tmp_path, http_server, monkeypatch, capsys, previous_raw
):
    out, before = previous_raw
    base_url, served = http_server
    write_idx_files(served / "mnist")
    sums = {
        role: sha256_of_file(served / "mnist" / name) for role, name in sources.IDX_FILES.items()
    }
    # One bit flipped on the mirror after the checksums were published.
    damaged = served / "mnist" / sources.IDX_FILES["train_images"]
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0x01
    damaged.write_bytes(bytes(content))
    served_mnist(monkeypatch, sums)
    params = write_params(
        tmp_path / "params.yaml",
        data={"source": "mnist", "path": None, "mirrors": [f"{base_url}/mnist/"]},
    )

    assert download.main(["--params", str(params), "--out", str(out)]) == 1
    error = one_line_error(capsys.readouterr().err, "download")
    assert "train-images-idx3-ubyte.gz" in error and "sha256" in error
    assert f"{base_url}/mnist/train-images-idx3-ubyte.gz" in error
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_truncated_download_is_retried_then_fails_and_keeps_the_previous_raw_data(
    tmp_path, monkeypatch, capsys, previous_raw
):
    out, before = previous_raw
    write_idx_files(tmp_path / "idx")
    name = sources.IDX_FILES["train_images"]
    body = (tmp_path / "idx" / name).read_bytes()
    server = ScriptedServer()
    try:
        # The server promises twice the bytes it sends, every time.
        mirror = server.url(f"/mnist/{name}", ("truncate", body)).removesuffix(name)
        sums = {role: sha256_of_file(tmp_path / "idx" / n) for role, n in sources.IDX_FILES.items()}
        served_mnist(monkeypatch, sums, backoff=0.01, timeout=5)
        params = write_params(
            tmp_path / "params.yaml", data={"source": "mnist", "path": None, "mirrors": [mirror]}
        )
        assert download.main(["--params", str(params), "--out", str(out)]) == 1
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    error = one_line_error(capsys.readouterr().err, "download")
    assert f"{mirror}{name}" in error and "after 4 tries" in error
    assert server.requests[f"/mnist/{name}"] == 4
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def download_cli(tmp_path, source, path):
    params = write_params(
        tmp_path / "params.yaml", data={"source": source, "path": str(path), "mirrors": []}
    )
    return run_cli("download", "--params", params, "--out", tmp_path / "data" / "raw")


def test_empty_class_folder_fails_download_in_one_line(tmp_path):
    make_image_folder(tmp_path / "photos", per_class=2, broken=False)
    (tmp_path / "photos" / "birds").mkdir()
    error = failed_in_one_line(download_cli(tmp_path, "folder", tmp_path / "photos"), "download")
    assert error == f"{tmp_path / 'photos' / 'birds'}: class folder 'birds' holds no files"
    assert list((tmp_path / "data").iterdir()) == []


def test_single_class_folder_fails_download_in_one_line(tmp_path):
    make_image_folder(tmp_path / "photos", per_class=2, broken=False)
    for path in (tmp_path / "photos" / "dogs").iterdir():
        path.unlink()
    (tmp_path / "photos" / "dogs").rmdir()
    error = failed_in_one_line(download_cli(tmp_path, "folder", tmp_path / "photos"), "download")
    assert error.endswith("need one subfolder per class and at least 2 classes, found ['cats']")
    assert list((tmp_path / "data").iterdir()) == []


def test_zip_escaping_its_folder_fails_download_and_writes_nothing_anywhere(tmp_path):
    archive = make_zip(
        tmp_path / "evil.zip", {"cats/a.png": b"x", "dogs/b.png": b"y", "../../evil.txt": b"owned"}
    )
    error = failed_in_one_line(download_cli(tmp_path, "archive", archive), "download")
    assert error == f"{archive}: member '../../evil.txt' escapes the destination folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil.zip", "params.yaml"]
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path.parent / "evil.txt").exists()


def test_data_path_that_is_not_an_archive_fails_download_in_one_line(tmp_path):
    not_archive = tmp_path / "photos.zip"
    not_archive.write_text("these are not the photos you are looking for\n" * 50)
    error = failed_in_one_line(download_cli(tmp_path, "archive", not_archive), "download")
    assert error == f"{not_archive}: not a zip or tar archive"
    assert list((tmp_path / "data").iterdir()) == []


def photo_preprocess(**overrides):
    return {
        "image_height": 32,
        "image_width": 32,
        "channels": 3,
        "resize": "pad",
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        **overrides,
    }


def preprocess_cli(tmp_path, params):
    return run_cli(
        "preprocess",
        "--params",
        params,
        "--raw",
        tmp_path / "raw",
        "--out",
        tmp_path / "prepared",
        "--metrics",
        tmp_path / "data.json",
        "--report",
        tmp_path / "data.md",
    )


def outputs_of(root):
    """What preprocess wrote under ``root``: the prepared folder, metrics and report."""
    return {
        "prepared": snapshot(root / "prepared"),
        "data.json": (root / "data.json").read_bytes(),
        "data.md": (root / "data.md").read_bytes(),
    }


def test_broken_images_past_the_allowed_fraction_fail_preprocess_and_keep_its_outputs(tmp_path):
    make_image_folder(tmp_path / "photos", per_class=8)  # 16 good images, 3 broken files
    folder = DataParams(source="folder", path=str(tmp_path / "photos"), mirrors=[], layout="auto")
    download.run(folder, out_dir=tmp_path / "raw")
    tolerant = project_params(preprocess=photo_preprocess(max_skipped_fraction=0.2))
    preprocess.run(
        tolerant.preprocess,
        raw_dir=tmp_path / "raw",
        out_dir=tmp_path / "prepared",
        metrics_path=tmp_path / "data.json",
        report_path=tmp_path / "data.md",
    )
    before = outputs_of(tmp_path)

    strict = write_params(
        tmp_path / "params.yaml", preprocess=photo_preprocess(max_skipped_fraction=0.1)
    )
    error = failed_in_one_line(preprocess_cli(tmp_path, strict), "preprocess")
    assert error.startswith(
        f"{tmp_path / 'raw' / 'files'}: 3 of 19 files are unusable (15.8%), "
        "above preprocess.max_skipped_fraction=0.1; for example "
    )
    assert outputs_of(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_archive_of_files_that_are_not_images_fails_preprocess_and_writes_nothing(tmp_path):
    texts = {f"{kind}/{i}.png": f"not a {kind} picture".encode() for kind in "ab" for i in range(3)}
    archive = make_zip(tmp_path / "texts.zip", texts)
    download.run(
        DataParams(source="archive", path=str(archive), mirrors=[], layout="auto"),
        out_dir=tmp_path / "raw",
    )
    params = write_params(tmp_path / "params.yaml", preprocess=photo_preprocess())
    error = failed_in_one_line(preprocess_cli(tmp_path, params), "preprocess")
    assert error.startswith(f"{tmp_path / 'raw' / 'files'}: 6 of 6 files are unusable (100.0%)")
    assert "a/0.png (not an image" in error
    for output in ("prepared", "data.json", "data.md"):
        assert not (tmp_path / output).exists()
    assert leftovers(tmp_path) == []


def test_download_cli_is_quiet_when_params_and_data_are_good(tmp_path):
    """The control for the cases above: the same command succeeds and says nothing."""
    written = make_image_folder(tmp_path / "photos", per_class=2, broken=False)
    zip_folder(tmp_path / "photos", tmp_path / "pets.zip", top="pets")
    done = download_cli(tmp_path, "archive", tmp_path / "pets.zip")
    assert (done.returncode, done.stderr) == (0, "")
    files = snapshot(tmp_path / "data" / "raw" / "files")
    expected = [f"{kind}/{name}" for kind, names in written.items() for name in names]
    assert sorted(files) == sorted(expected)
    assert leftovers(tmp_path) == []
