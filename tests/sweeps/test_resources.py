"""How trials share the machine: threads per worker, one GPU each, and the trial's file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from classifier.sweeps.resources import plan_share, visible_gpus
from classifier.training import trial
from classifier.training.trial import TrialSetup, claim_device, read_setup, write_setup


@pytest.mark.parametrize(
    ("workers", "cores", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5)]
)
def test_the_cores_are_divided_between_the_workers_at_least_one_each(workers, cores, threads):
    assert plan_share(workers, cores, ()).threads == threads


def test_gpus_come_from_cuda_visible_devices_when_it_is_set():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, nvidia_smi="0\n1\n") == ("2", "3")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, nvidia_smi="0\n") == ()
    # CUDA ignores the list from the first invalid entry on.
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, nvidia_smi="") == ("1",)


def test_gpus_come_from_nvidia_smi_otherwise_and_none_without_it():
    assert visible_gpus({}, nvidia_smi="0\n1\n") == ("0", "1")
    assert visible_gpus({}, nvidia_smi="") == ()


def test_workers_with_gpus_start_with_memory_growth_on():
    assert plan_share(2, 8, ("0", "1")).worker_env() == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert plan_share(2, 8, ()).worker_env() == {}


@pytest.fixture
def released():
    """Let go of every device this process claimed in the test."""
    yield
    while trial._held:
        trial._held.pop().close()


def test_each_running_trial_takes_a_gpu_no_other_holds(tmp_path, released):
    assert claim_device(("0", "1"), tmp_path) == "0"
    assert claim_device(("0", "1"), tmp_path) == "1"
    # More trials than GPUs: the next one runs on the CPU rather than share a GPU.
    assert claim_device(("0", "1"), tmp_path) is None
    trial._held.pop(0).close()  # the first trial ends
    assert claim_device(("0", "1"), tmp_path) == "0"


def test_a_gpu_is_free_again_when_its_trial_is_killed(tmp_path, released):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from classifier.training.trial import claim_device; "
            f"print(claim_device(('0', '1'), Path({str(tmp_path)!r})), flush=True); "
            "time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_device(("0", "1"), tmp_path) == "1"
        trial._held.pop().close()
    finally:
        holder.kill()
        holder.wait()
    assert claim_device(("0",), tmp_path) == "0"


def test_a_trial_shows_tensorflow_only_its_gpu_with_memory_growth(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    trial._use_device("1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    trial._use_device(None)  # no GPU left: hide them all
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_the_train_stage_reads_the_setup_the_sweep_wrote_for_its_experiment(tmp_path):
    setup = TrialSetup("example", "0123abcd", threads=1, devices=("0", "1"))
    write_setup(tmp_path, "example-3", setup)
    assert read_setup(tmp_path, "example-3") == setup
    assert read_setup(tmp_path, "example-4") is None  # not this sweep's trial
    (tmp_path / trial.TRIALS_DIR / "broken-1.json").write_text("{")
    assert read_setup(tmp_path, "broken-1") is None


def test_outside_a_sweep_the_train_stage_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    assert trial.join_sweep() is None
    assert dict(os.environ) == before


@pytest.mark.slow
def test_a_trial_limits_tensorflow_to_its_threads_before_it_starts():
    """In a fresh process, as the train stage does: the limit is what TensorFlow then uses."""
    code = (
        "import keras, tensorflow as tf; from classifier.training import trial; "
        "trial._set_threads(1); keras.ops.ones((2, 2)); "
        "print(tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["1", "1"]
