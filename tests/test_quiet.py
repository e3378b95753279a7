"""Library noise stays out of the terminal unless LOG_LEVEL=DEBUG (classifier/quiet.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from classifier.quiet import is_noise, native_stderr_filtered
from tests.helpers import PROJECT_ROOT

# What TensorFlow 2.20 printed at the start of every stage, verbatim (tails cut).
START_UP_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796692305.134909    8676 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors",
    "I0000 00:00:1796692305.135361    8676 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796692489.994863   14868 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: "
    "FLOAT32",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]
CUINIT = (
    "E0000 00:00:1796692309.678557    8676 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
)
KEPT_LINES = [
    "W0000 00:00:1796692309.678557    8676 op_kernel.cc:1857] OP_REQUIRES failed: bad shape",
    "E0000 00:00:1796692309.678557    8676 cuda_dnn.cc:522] Could not create cudnn handle",
    "<string>:7: UserWarning: a python warning",
    "export: error: models/model.keras: not found",
]


def test_start_up_lines_are_noise_and_warnings_and_errors_are_not():
    assert all(is_noise(line + "\n") for line in [*START_UP_LINES, CUINIT])
    assert not any(is_noise(line) for line in KEPT_LINES)
    # Where there is a GPU, a failed cuInit means it goes unused: say so.
    assert not is_noise(CUINIT, has_gpu=True)


def test_native_stderr_is_written_back_without_the_noise(capfd):
    with native_stderr_filtered():
        os.write(2, "".join(line + "\n" for line in [*START_UP_LINES, *KEPT_LINES]).encode())
    assert capfd.readouterr().err == "".join(line + "\n" for line in KEPT_LINES)


# Imports the library, then TensorFlow; runs one op; TensorFlow warns before a stage's
# logging is set up, and while it runs.
TENSORFLOW_PROGRAM = """
import classifier, tensorflow as tf
tf.constant(1) + 1
tf.get_logger().warning("before")
from classifier.cli import run_stage
run_stage("demo", lambda: tf.get_logger().warning("while"))
"""


def import_tensorflow(**env: str) -> str:
    """stderr of TENSORFLOW_PROGRAM."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LOG_LEVEL", "TF_CPP_MIN_LOG_LEVEL") and not key.startswith("MLFLOW_")
    }
    done = subprocess.run(
        [sys.executable, "-c", TENSORFLOW_PROGRAM],
        cwd=PROJECT_ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stderr


@pytest.mark.slow
def test_tensorflow_starts_silently_unless_log_level_is_debug_and_warns_once():
    lines = import_tensorflow().splitlines()
    assert lines[0] == "WARNING:tensorflow:before" and len(lines) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d demo: while", lines[1])
    debug = import_tensorflow(LOG_LEVEL="DEBUG")
    assert "port.cc" in debug and "absl::InitializeLog" in debug
