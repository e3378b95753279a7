"""The benchmarks run by hand still run, and report what they measured: each module's main
on tiny inputs (a few images, one round, one epoch), its figures checked against what the
test computes itself."""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import benchmarks
from benchmarks import (
    augment,
    inference,
    ingest,
    mnist,
    overhead,
    photos,
    pyfunc,
    server,
    server_load,
    summary,
)
from benchmarks import train as train_benchmark
from classifier.data.dataset import ImageSet, read_image_set, write_image_set
from classifier.export.formats import ExportError, export_formats, load_runner
from classifier.export.formats import representative_images as calibration_images
from classifier.model.files import load_model
from classifier.model.tta import single_view
from classifier.processes import ProcessGroup
from tests.helpers import (
    PROJECT_ROOT,
    STAGES,
    make_image_folder,
    readme_photo_settings,
    run_ok,
    write_idx_files,
)

LEVERS = {
    "onnx_tuned": "onnx",
    "onnx_1_thread": "onnx",
    "onnx_parallel": "onnx",
    "tflite_float32_1_thread": "tflite_float32",
    "tflite_int8_1_thread": "tflite_int8",
    "tflite_int8_no_xnnpack": "tflite_int8",
    "tflite_int8_remember_shape": "tflite_int8",
}
RUNNERS = [
    inference.BASELINE,
    "keras",
    "keras_call",
    "saved_model",
    "tflite_float32",
    "tflite_int8",
    "onnx",
    *LEVERS,
]


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the benchmarks write their JSON to, run from the project's root."""
    folder = tmp_path / "results"
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", folder)
    monkeypatch.chdir(PROJECT_ROOT)  # params.yaml, and `python -m benchmarks...` in children
    return folder


def result(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def started_groups(monkeypatch: pytest.MonkeyPatch) -> list[ProcessGroup]:
    """Every process group started from now on, in order (still started for real)."""
    started = []
    start = ProcessGroup.start.__func__

    def recording(cls, *args, **kwargs):
        group = start(cls, *args, **kwargs)
        started.append(group)
        return group

    monkeypatch.setattr(ProcessGroup, "start", classmethod(recording))
    return started


def living(group: ProcessGroup) -> list[int]:
    """Members of ``group`` still running: neither gone nor a zombie that init will reap."""
    alive = []
    for pid in group.members():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":  # the state follows the command name
            alive.append(pid)
    return alive


# ---------------------------------------------------------------------------- mnist


@pytest.mark.slow
def test_mnist_benchmark_runs_the_stages_on_idx_files_and_reports(
    tmp_path, results, monkeypatch, capsys
):
    write_idx_files(tmp_path / "idx", train=200, test=20)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset by the benchmark, restored by the test")
    work = tmp_path / "work"
    arguments = ["--data", str(tmp_path / "idx"), "--epochs", "1", "--batch-size", "16"]
    overrides = ["-S", "train.schedule=warmup_cosine", "-S", "train.learning_rate=0.002"]

    assert mnist.main([*arguments, *overrides, "--work-dir", str(work)]) == 0

    reported = result(results, "mnist-reference_cnn")
    assert reported["images"] == {"train": 180, "val": 20, "test": 20}
    assert reported["overrides"] == {
        "train.schedule": "warmup_cosine",
        "train.learning_rate": 0.002,
    }
    # The accuracy it reports is the trained model's on the 20 test digits, recomputed here.
    test = read_image_set(work / "prepared" / "test")
    model = load_model(str(work / "model" / "model.keras"))
    predicted = model.predict(test.images, batch_size=256, verbose=0).argmax(axis=1)
    assert reported["test_accuracy"] == round(float(np.mean(predicted == test.labels)), 4)
    assert reported["parameters"] == model.count_params()
    history = pd.read_csv(work / "model" / "history.csv")
    assert reported["val_accuracy_by_epoch"] == [round(v, 4) for v in history["val_accuracy"]]
    assert set(reported["seconds"]) == {"download", "preprocess", "train", "evaluate"}
    assert capsys.readouterr().out.endswith(json.dumps(reported, indent=2) + "\n")


# ---------------------------------------------------------------------------- train


def test_train_benchmark_ratio_pairs_each_round_so_drift_between_rounds_cancels():
    def result(seconds: float) -> dict:
        epochs = [{"epoch": 1, "seconds": seconds, "test_accuracy": 0.9}]
        return {"seconds": seconds, "epochs": epochs, "train_images": 1000}

    # The machine slowed down for round 2's stage and round 3's plain run; in every round
    # but the second the stage took half the plain script's time.
    runs = {
        "plain": [result(10), result(11), result(40)],
        "stage_float32": [result(5), result(30), result(20)],
    }
    args = argparse.Namespace(data="idx", epochs=1, batch_size=64, rounds=3)

    stage = train_benchmark.summarise(runs, args)["variants"]["stage_float32"]

    assert stage["throughput_vs_plain_by_round"] == [2.0, 0.37, 2.0]
    assert stage["throughput_vs_plain"] == 2.0  # the ratio of the medians would say 0.55


@pytest.mark.slow
def test_train_benchmark_runs_each_variant_in_a_process_and_times_the_stages_mlflow_calls(
    tmp_path, results, capsys
):
    write_idx_files(tmp_path / "idx", train=120, test=20)
    argv = ["--data", str(tmp_path / "idx"), "--subset", "60", "--epochs", "1"]

    assert train_benchmark.main([*argv, "--batch-size", "16", "--variants", "plain,stage"]) == 0

    reported = result(results, "train")
    plain, stage = reported["variants"]["plain"], reported["variants"]["stage"]
    assert plain["epochs"] == stage["epochs"] == 1
    assert len(plain["test_accuracy_by_epoch"]) == len(stage["test_accuracy_by_epoch"]) == 1
    # Timed through classifier.tracking.runs, which the stage calls: opening and closing
    # the run (training_run) and the epoch's metrics.
    assert {"open_run", "close_run", "log_epoch"} <= set(reported["tracking_seconds_by_call"])
    assert reported["tracking_seconds"] > 0
    assert stage["throughput_vs_plain"] == stage["throughput_vs_plain_by_round"][0]
    # Same images and epochs: the throughput ratio is the ratio of training seconds (0.1 s).
    plain_s, stage_s = plain["training_seconds"], stage["training_seconds"]
    low, high = (plain_s - 0.05) / (stage_s + 0.05), (plain_s + 0.05) / (stage_s - 0.05)
    assert low - 0.005 <= stage["throughput_vs_plain"] <= high + 0.005
    assert "| stage | " in capsys.readouterr().out


@pytest.mark.slow
def test_untracked_stage_variant_opens_no_mlflow_run_and_puts_the_tracking_calls_back(
    tmp_path, monkeypatch
):
    from classifier.tracking import runs

    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "set by the benchmark, restored by the test")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "restored by the test")
    write_idx_files(tmp_path / "idx", train=80, test=10)
    data = train_benchmark.load_mnist(tmp_path / "idx", subset=40)
    names = (*train_benchmark.TRACKING_CALLS, "training_run")
    originals = {name: getattr(runs, name) for name in names}
    work = tmp_path / "work"
    work.mkdir()

    measured = train_benchmark.pipeline_stage(
        data, "stage_untracked", {"epochs": 1, "batch_size": 16}, work
    )

    assert [epoch["epoch"] for epoch in measured["epochs"]] == [1]
    assert measured["tracking_seconds"] == 0
    assert measured["tracking_seconds_by_call"] == {}
    assert json.loads((work / "model" / "train_run.json").read_text())["run_id"] == "untracked"
    assert not (work / "mlflow.db").exists()
    assert {name: getattr(runs, name) for name in names} == originals


# ---------------------------------------------------------------------------- ingest


@pytest.mark.slow
def test_ingest_benchmark_times_the_stages_and_the_plain_loop_on_the_same_photos(results, capsys):
    assert ingest.main(["--images", "20", "--size", "16"]) == 0

    reported = result(results, "ingest")
    assert reported["images"] == 20
    assert reported["target"] == "16x16x3"
    for side in ("pipeline", "baseline"):
        figures = reported[side]
        seconds = figures["seconds"]
        assert 20 / (seconds + 0.005) - 0.005 <= figures["images_per_second"]
        assert figures["images_per_second"] <= 20 / (seconds - 0.005) + 0.005
        assert figures["peak_rss_mib"] > 0
    # The speedup is the baseline's seconds over the pipeline's, before rounding to 0.01.
    baseline, pipeline = reported["baseline"]["seconds"], reported["pipeline"]["seconds"]
    low, high = (baseline - 0.005) / (pipeline + 0.005), (baseline + 0.005) / (pipeline - 0.005)
    assert low - 0.005 <= reported["speedup"] <= high + 0.005
    assert capsys.readouterr().out.endswith(json.dumps(reported, indent=2) + "\n")


@pytest.mark.slow
def test_ingest_benchmark_fails_a_side_that_did_not_write_every_photo(results, monkeypatch):
    # A plain loop that skips the first photo of each class folder: faster, and wrong.
    skipping = ingest.BASELINE.replace("sorted(folder.iterdir())", "sorted(folder.iterdir())[1:]")
    assert skipping != ingest.BASELINE
    monkeypatch.setattr(ingest, "BASELINE", skipping)

    with pytest.raises(SystemExit, match=r"baseline wrote images of shape \(18, 16, 16, 3\), "):
        ingest.main(["--images", "20", "--size", "16"])
    assert not results.exists()


# ---------------------------------------------------------------------------- photos


@pytest.mark.slow
def test_photos_benchmark_runs_the_recipe_and_reports_what_evaluate_measured(
    tmp_path, results, monkeypatch, capsys
):
    folder = tmp_path / "photos"
    make_image_folder(folder, per_class=14, broken=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the benchmark points it at its own store
    argv = ["--data", str(folder), "--sizes", "16", "--epochs", "1", "-S", "train.batch_size=8",
            "--seeds", "5", "--work-dir", str(tmp_path / "work")]  # fmt: skip
    assert photos.main(argv) == 0

    (reported,) = result(results, "photos")["results"]
    assert (reported["architecture"], reported["size"]) == ("photo_resnet", 16)
    assert reported["settings"]["train.augment"] == "photo"  # the recipe, with the overrides
    assert reported["settings"]["train.epochs"] == 1
    assert reported["settings"]["train.seed"] == reported["seed"] == 5
    run_dir = tmp_path / "work" / "photo_resnet-16-seed5"
    evaluated = json.loads((run_dir / "evaluate.json").read_text())
    for key in ("accuracy", "ece", "ece_uncalibrated", "temperature"):
        assert reported[key] == evaluated[key]
    test = read_image_set(run_dir / "prepared" / "test")
    assert reported["test_images"] == len(test.labels)
    # The recipe averages each photo with its mirror; the same weights on the photo alone:
    model = load_model(str(run_dir / "model" / "model.keras"))
    single = single_view(model).predict(test.images, verbose=0).argmax(axis=1) == test.labels
    assert reported["single_view_accuracy"] == single.mean()
    gained = reported["only_flip_average_right"] - reported["only_single_view_right"]
    assert reported["accuracy"] - single.mean() == pytest.approx(gained / len(test.labels))
    low, high = reported["accuracy_ci95"]
    assert 0 <= low <= reported["accuracy"] <= high <= 1 and high - low > 0.2  # a few photos
    minutes = reported["seconds"]["train"] / 60
    assert reported["accuracy_per_minute"] == pytest.approx(reported["accuracy"] / minutes)
    epoch = reported["seconds"]["train"]
    assert reported["augment_slowdown"] == pytest.approx(
        reported["augment_seconds_per_epoch"] / (epoch - reported["augment_seconds_per_epoch"])
    )
    assert "| photo_resnet | 16x16 | 1 | 5 |" in capsys.readouterr().out


def test_photos_benchmark_trains_the_readmes_recipe():
    """Every setting of README.md's photo example but the data, the size (the benchmark's
    --sizes) and the registered name is in the benchmark's recipe, with the same value."""
    readme = readme_photo_settings()
    for key in ("data.source", "data.path", "preprocess.image_height", "preprocess.image_width",
                "export.model_name"):  # fmt: skip
        readme.pop(key)
    recipe = {key: value for key, value in photos.RECIPE.items() if key in readme}
    assert recipe == readme
    assert readme["preprocess.near_duplicate_distance"] == 4  # the one it once lacked


def test_photos_table_gives_each_seed_a_row_and_their_mean():
    def run(seed: int, accuracy: float, single: float | None) -> dict:
        figures = {"single_view_accuracy": single, "only_flip_average_right": 3,
                   "only_single_view_right": 1} if single is not None else {}  # fmt: skip
        return {"architecture": "photo_resnet", "size": 64, "settings": {"train.epochs": 60},
                "seed": seed, "accuracy": accuracy, "accuracy_ci95": [0.8, 0.9], "ece": 0.04,
                "ece_uncalibrated": 0.05, "train_minutes": 10.0, "accuracy_per_minute": 0.08,
                "augment_slowdown": 0.05, **figures}  # fmt: skip

    table = photos.results_table([run(42, 0.86, 0.83), run(1, 0.84, 0.82)]).splitlines()
    assert len(table) == 5  # header, rule, two runs, their mean
    assert table[2].startswith("| photo_resnet | 64x64 | 60 | 42 | 0.8600 (0.800-0.900) |")
    assert "| 0.8300 (3 / 1) | 0.0400 (0.0500) | 10.0 |" in table[2]
    assert table[4].startswith("| mean |  |  |  | 0.8500 | 0.8250 | 0.0400 | 10.0 |")
    without = photos.results_table([run(42, 0.86, None)]).splitlines()
    assert len(without) == 3 and "| no flip average |" in without[2]


@pytest.mark.slow
def test_augment_benchmark_sets_augmenting_against_fitting_the_same_images(
    tmp_path, results, monkeypatch
):
    folder = tmp_path / "photos"
    make_image_folder(folder, per_class=10, broken=False)
    fitted = []
    measure = augment.measure

    def recording(images, labels, *args):
        fitted.append(images.shape)
        return measure(images, labels, *args)

    monkeypatch.setattr(augment, "measure", recording)
    assert augment.main(["--data", str(folder), "--sizes", "16", "--epochs", "1"]) == 0

    reported = result(results, "augment")
    assert reported["augment"] == "photo" and reported["architecture"] == "photo_resnet"
    (figures,) = reported["results"]
    assert fitted == [(figures["images"], 16, 16, 3)]  # the train split, prepared at 16x16
    assert figures["slowdown"] == pytest.approx(figures["augment_seconds"] / figures["fit_seconds"])
    assert figures["augment_seconds"] > 0 and figures["fit_seconds"] > 0


# ---------------------------------------------------------------------------- overhead


@pytest.mark.slow
def test_overhead_benchmark_times_a_no_op_repro_and_importing_each_stage(tmp_path, results, capsys):
    project = tmp_path / "project"
    project.mkdir()
    for package in ("stages", "classifier"):
        (project / package).symlink_to(PROJECT_ROOT / package)
    (project / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: echo hello > out.txt\n    outs:\n      - out.txt\n"
    )
    run_ok(project, "dvc", "init", "--no-scm", "-q")
    argv = ["--project", str(project), "--repeats", "1"]

    with pytest.raises(SystemExit, match="not up to date"):  # its first repro runs `hello`
        overhead.main(argv)
    assert overhead.main(argv) == 0

    reported = result(results, "overhead")
    assert list(reported["stage_import_s"]) == STAGES
    assert all(seconds > 0 for seconds in reported["stage_import_s"].values())
    assert reported["no_op_dvc_repro_s"] > 0
    assert reported["repeats"] == 1
    # Importing stages.train loads Keras (it builds the model); stages.download neither
    # TensorFlow nor MLflow.
    heavy = {
        stage: set(loaded.split(",")) for stage, loaded in reported["stage_imports_heavy"].items()
    }
    assert "keras" in heavy["train"]
    assert not {"tensorflow", "keras", "mlflow"} & heavy["download"]
    table = capsys.readouterr().out
    assert [f"| stages.{stage} |" in table for stage in STAGES] == [True] * len(STAGES)


# ---------------------------------------------------------------------------- summary


def test_summary_sets_each_target_against_the_latest_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path)

    def write(name: str, result: dict) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    plain = {"training_seconds": 46.2, "epochs": 3, "seconds_to_99": None, "test_accuracy": 0.98}
    stage = {
        "throughput_vs_plain": 1.25,
        "throughput_vs_plain_by_round": [1.1, 1.25, 1.6],
        "seconds_to_99": 19.5,
        "test_accuracy": 0.99,
    }
    write(
        "train",
        {
            "variants": {"plain": plain, "stage": stage},
            "tracking_share_percent": 0.8,
            "tracking_seconds": 0.26,
        },
    )
    write("overhead", {"no_op_dvc_repro_s": 0.8, "repeats": 5})
    small = {"architecture": "small_bn_cnn", "epochs": 20, "test_accuracy": 0.9961}
    write("mnist-small_bn_cnn", {**small, "parameters": 72_770})
    # More accurate, but over the parameter budget: not the small model's result.
    write(
        "mnist-wide", {**small, "architecture": "wide", "parameters": 200_000, "test_accuracy": 1}
    )
    write(
        "mnist-reference_cnn",
        {"architecture": "reference_cnn", "epochs": 10, "test_accuracy": 0.99},
    )

    # The most accurate photo run is the one set against the target, ECE included.
    photo = {"architecture": "photo_resnet", "accuracy_ci95": [0.82, 0.90], "train_minutes": 7.4}
    write("photos", {"results": [
        {**photo, "size": 64, "accuracy": 0.8667, "ece": 0.049},
        {**photo, "size": 96, "accuracy": 0.84, "ece": 0.01},
    ]})  # fmt: skip
    write("augment", {"augment": "photo", "results": [
        {"size": 64, "slowdown": 0.05}, {"size": 96, "slowdown": 0.25},
    ]})  # fmt: skip

    assert summary.main([]) == 0

    table = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out == table
    met = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[-1] for row in table.splitlines()[2:]}
    assert list(met.values()) == [
        "**no** |",
        "yes |",
        "yes |",
        "yes |",
        "not run |",
        "yes |",
        "**no** |",
        "yes |",
    ]
    assert "photo_resnet at 64x64: 86.7% (95 % CI 82.0% to 90.0%), ECE 0.049, 7.4 min" in table
    assert "64x64: 5.0%, 96x96: 25.0%" in table  # the slowest size decides
    assert "1.25x (rounds 1.1x to 1.6x)" in table
    assert "stage 19.5 s; plain not there after 46.2 s (3 epochs): < 0.42x" in table
    assert "`benchmarks/results/inference.json` missing" in table
    assert "small_bn_cnn (72,770 parameters): 99.61% after 20 epochs" in table


def test_summary_meets_the_inference_target_if_any_batch_size_reaches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path)
    fastest = {
        "32": {"runner": "tflite_int8", "ratio": 51.0},
        "1024": {"runner": "saved_model", "ratio": 2.9},
    }
    (tmp_path / "inference.json").write_text(json.dumps({"fastest_exported_format": fastest}))

    (row,) = [row for row in summary.rows() if row[0].startswith("batch inference")]

    assert row[1:] == ("batch 32: tflite_int8 51.0x, batch 1024: saved_model 2.9x", "yes")


# ---------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def exported_formats(trained, tmp_path_factory) -> Path:
    """The session's trained model in every exported format."""
    out_dir = tmp_path_factory.mktemp("formats")
    train_images = read_image_set(trained.data_dir / "train").images
    export_formats(trained.model_path, calibration_images(train_images), out_dir)
    return out_dir


@pytest.mark.slow
def test_inference_benchmark_times_every_runner_and_lever_against_keras_predict(
    trained, exported_formats, results, capsys
):
    argv = [
        "--model-dir",
        str(trained.model_path.parent),
        "--formats-dir",
        str(exported_formats),
        "--data",
        str(trained.data_dir / "test"),
        "--batch-sizes",
        "1,8",
        "--images",
        "16",
        "--repeats",
        "2",
        "--seconds",
        "0.01",
    ]

    assert inference.main(argv) == 0

    reported = result(results, "inference")
    runners = reported["runners"]
    assert list(runners) == RUNNERS
    # Every runner gives Keras's answers on the test split: float ones its probabilities,
    # the int8 ones (whatever the thread count, delegate or shape lookup) nearly its classes.
    for name, figures in runners.items():
        if "int8" in name:
            assert figures["argmax_agreement"] >= 0.95, name
        else:
            assert figures["max_abs_diff"] < 1e-4, name
            assert figures["argmax_agreement"] == 1.0, name
    assert {name: runners[name]["varies"] for name in LEVERS} == LEVERS
    assert runners["onnx_1_thread"]["threads"].startswith("ORT intra-op 1,")
    assert list(reported["batch_sizes"]) == ["1", "8"]
    assert reported["images"] == 16
    for size, by_runner in reported["batch_sizes"].items():
        assert by_runner[inference.BASELINE]["ratio"] == 1.0
        assert set(by_runner) == set(RUNNERS)
        assert all("gain" in by_runner[name] for name in LEVERS)
        best = max(inference.EXPORTED, key=lambda name: by_runner[name]["ratio"])
        expected = {"runner": best, "ratio": by_runner[best]["ratio"]}
        assert reported["fastest_exported_format"][size] == expected
        assert reported["target_met"][size] == (expected["ratio"] >= inference.TARGET_RATIO)
    printed = capsys.readouterr().out
    assert "| tflite_int8_remember_shape | tflite_int8 |" in printed  # the levers' table

    # benchmarks.summary reads this result for the batch inference target.
    (row,) = [row for row in summary.rows() if row[0].startswith("batch inference")]
    assert row[2] == ("yes" if any(reported["target_met"].values()) else "**no**")


def test_inference_benchmark_names_the_missing_pipeline_output(tmp_path, results, capsys):
    argv = ["--model-dir", str(tmp_path), "--data", str(tmp_path / "test")]

    assert inference.main(argv) == 1

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"benchmarks.inference: error: {tmp_path / 'model.keras'}: missing; run `make run` first"
    )
    assert not results.exists()


@pytest.mark.parametrize(
    ("fmt", "knobs", "named"),
    [
        ("onnx", {"num_threads": 1}, "num_threads"),
        ("keras", {"xnnpack": False, "remember_shape": True}, "xnnpack, remember_shape"),
        ("tflite_int8", {"session_options": object()}, "session_options"),
    ],
)
def test_load_runner_refuses_a_knob_of_another_runtime(tmp_path, fmt, knobs, named):
    with pytest.raises(ExportError, match=f"^{fmt}: cannot set {named} for this format$"):
        load_runner(fmt, tmp_path / "model", **knobs)


# ---------------------------------------------------------------------------- pyfunc, server


def model_argv(trained, registered) -> list[str]:
    return [
        "--data",
        str(trained.data_dir / "test"),
        "--tracking-uri",
        trained.store_uri,
        "--model-name",
        registered["name"],
        "--requests",
        "4",
        "--warmup",
        "1",
    ]


@pytest.mark.slow
def test_pyfunc_benchmark_times_the_registered_model_in_a_worker_then_stops_it(
    trained, registered, results, monkeypatch, capsys
):
    groups = started_groups(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "set by the benchmark, restored by the test")

    assert pyfunc.main(model_argv(trained, registered)) == 0

    reported = result(results, "pyfunc")
    assert reported["model_uri"] == f"models:/{registered['name']}@champion"
    assert reported["version"] == registered["version"]
    assert reported["requests"] == 4
    # Both ways in, the pyfunc names the class the runtime in it names, every time.
    assert [reported[kind]["wrong"] for kind in pyfunc.KINDS] == [0] * len(pyfunc.KINDS)
    for kind in ("png", "array"):
        ratio = reported[kind]["p50_ms"] / reported[pyfunc.BASELINE]["p50_ms"]
        assert reported[f"overhead_{kind}"]["p50_ratio"] == round(ratio, 2)
    assert "| keras | " in capsys.readouterr().out
    # The worker ran in a process group of its own, and none of it is left.
    assert [group.name for group in groups] == ["the direct pyfunc"]
    assert [group.process.poll() is not None for group in groups] == [True]
    assert [living(group) for group in groups] == [[]]


@pytest.mark.slow
def test_server_benchmark_times_the_model_server_against_the_pyfunc_then_stops_both(
    trained, registered, results, monkeypatch, capsys
):
    groups = started_groups(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "set by the benchmark, restored by the test")

    assert server.main([*model_argv(trained, registered), "--batch-rounds", "1"]) == 0

    reported = result(results, "server")
    assert reported["version"] == registered["version"]
    assert set(reported["startup_seconds"]) == set(server.SERVERS)
    # Over HTTP, PNG or pixels, every server names the class the pyfunc named directly.
    assert [reported[mode]["wrong"] for mode in server.MODES] == [0] * len(server.MODES)
    assert [figures["disagreements"] for figures in reported["batch"].values()] == [0, 0, 0]
    for kind in ("png", "array"):
        ratio = reported[f"serve_{kind}"]["p50_ms"] / reported[f"direct_{kind}"]["p50_ms"]
        assert reported[f"overhead_{kind}"]["p50_ratio"] == round(ratio, 2)
    ratio = reported["serve_png"]["p50_ms"] / reported["mlflow_png"]["p50_ms"]
    assert reported["ratios"]["p50_serve_png_over_mlflow_png"] == round(ratio, 3)
    assert "| serve_png | " in capsys.readouterr().out
    assert sorted(group.name for group in groups) == [
        "the direct pyfunc", "the keras server", "the mlflow server", "the serve server",
    ]  # fmt: skip
    assert [group.process.poll() is not None for group in groups] == [True] * 4
    assert [living(group) for group in groups] == [[]] * 4  # uvicorn's workers too


@pytest.mark.slow
def test_server_load_benchmark_loses_no_request_and_times_ping_idle_and_loaded(
    trained, registered, results, monkeypatch, capsys
):
    groups = started_groups(monkeypatch)
    argv = [*model_argv(trained, registered)[:6], "--quick", "--size", "300", "--pings", "5"]
    assert server_load.main(argv) == 0
    reported = result(results, "server_load")
    assert reported["version"] == registered["version"]
    assert reported["requests_ok"] == 4 and reported["requests_not_ok"] == []
    assert reported["load"]["image_pixels"] == 300 * 300
    assert reported["ping"]["idle"]["pings"] == 5 and reported["ping"]["under load"]["pings"] >= 1
    ratio = reported["ping"]["under load"]["p99_ms"] / reported["ping"]["idle"]["p99_ms"]
    assert reported["p99_ratio_load_over_idle"] == round(ratio, 2)
    assert "| under load | " in capsys.readouterr().out
    assert [group.name for group in groups] == ["the serve server"]
    assert [living(group) for group in groups] == [[]]


def test_pyfunc_benchmark_names_a_model_that_is_not_registered(
    tmp_path, mlflow_store, results, monkeypatch, capsys
):
    from classifier.tracking import store

    store.connect()  # creates the (empty) store
    images = np.zeros((2, 28, 28, 1), np.uint8)
    write_image_set(tmp_path / "test", ImageSet(images, np.array([0, 1]), ("a", "b")))
    groups = started_groups(monkeypatch)
    argv = ["--data", str(tmp_path / "test"), "--tracking-uri", mlflow_store]

    assert pyfunc.main([*argv, "--model-name", "no-such-model"]) == 1

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"benchmarks.pyfunc: error: {mlflow_store}: no model version "
        "models:/no-such-model@champion; run `make run` first"
    )
    assert groups == []
    assert not results.exists()
