"""Library noise stays below the default log level: ``LOG_LEVEL=DEBUG`` lets all of it through.

What a stage would otherwise print, and how each is held back:

- TensorFlow's C++ start-up lines (``I0000 ... port.cc`` oneDNN, ``cudart_stub.cc`` no CUDA
  driver, ``cpu_feature_guard.cc``, and ``E0000 ... cuInit`` on a machine without a GPU),
  each pair twice since two of TensorFlow's libraries log them. ``TF_CPP_MIN_LOG_LEVEL``
  hides only some: the oneDNN and CUDA-stub lines come from static initialisers through
  absl before anything reads it ("All log messages before absl::InitializeLog() is called
  are written to STDERR"). So the first import of ``tensorflow``, and its device
  enumeration, where cuInit runs, write file descriptor 2 into a temporary file; the lines
  known to be start-up noise are dropped and anything else is written back. A failed
  cuInit is kept on a machine that has an NVIDIA device: there it means the GPU is unused.
  oneDNN stays on (``TF_ENABLE_ONEDNN_OPTS`` would change the numbers), only its notice goes.
- Two notices the same way: the TFLite converter's "fully_quantize: 0, inference_type: 6..."
  (classifier/export/formats.py) and LiteRT's "Created TensorFlow Lite XNNPACK delegate",
  printed at an interpreter's first allocation (classifier/serving/runtime.py).
- MLflow's "Downloading artifacts" progress bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``)
  and its INFO lines (``MLFLOW_LOGGING_LEVEL=WARNING``); its warning that pip's version is
  unknown (uv installs no pip into the environment) is filtered out by name.
- TensorFlow's Python warnings printed twice (log_tensorflow_through_root).

Environment variables the user set win (``os.environ.setdefault``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_LEVEL_ENV = "LOG_LEVEL"
QUIET_ENVIRONMENT = {
    # INFO and WARNING from TensorFlow's C++ logging, once absl has started.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} \S+ +\d+ \S+\.cc:\d+\] .*"  # absl's INFO lines
    r"|To enable the following instructions: .*in other operations, rebuild TensorFlow .*"
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
    r"output_inference_type: \w+"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$"
)
FAILED_CUINIT = re.compile(r"^E\d{4} \S+ +\d+ \S+\.cc:\d+\] failed call to cuInit: .*$")
NVIDIA_DEVICE = Path("/dev/nvidiactl")
PIP_VERSION_WARNING = "Failed to resolve installed pip version"
MLFLOW_ENVIRONMENT_LOGGER = "mlflow.utils.environment"
TENSORFLOW_LOGGER = "tensorflow"


def debugging() -> bool:
    """Whether ``LOG_LEVEL`` asks for everything (DEBUG)."""
    return os.environ.get(LOG_LEVEL_ENV, "").strip().upper() == "DEBUG"


def is_noise(line: str, has_gpu: bool = False) -> bool:
    """Whether ``line`` (from TensorFlow's or LiteRT's C++) is noise a person needs not see."""
    line = line.rstrip("\r\n")
    return bool(NOISE.match(line)) or (not has_gpu and bool(FAILED_CUINIT.match(line)))


@contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Hold back what C++ code writes to file descriptor 2; write back all but the noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            held.seek(0)
            has_gpu = NVIDIA_DEVICE.exists()
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines(keepends=True)
                if not is_noise(line, has_gpu)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, and its device enumeration, with stderr filtered."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:  # resource readers and the like
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_stderr_filtered():
            self._loader.exec_module(module)
            # cuInit runs here (at the first device lookup), not at import.
            module.config.list_physical_devices()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands the first import of ``tensorflow`` a filtering loader."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def log_tensorflow_through_root() -> None:
    """Once logging is set up, TensorFlow's warnings go through it alone, printed once.

    TensorFlow gives its logger a handler of its own if it logs before the root logger has
    one, and that logger still passes its records on to the root: a warning it gave while
    a stage ran was printed twice, once in each format."""
    if not logging.getLogger().handlers:
        return
    known = logging.Logger.manager.loggerDict.get(TENSORFLOW_LOGGER)
    if isinstance(known, logging.Logger):
        known.handlers.clear()


class _DropPipVersionWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return PIP_VERSION_WARNING not in record.getMessage()


def quiet_library_noise() -> None:
    """Keep TensorFlow's and MLflow's noise out of the terminal, unless LOG_LEVEL=DEBUG.

    Call it before TensorFlow or MLflow is imported: the package ``classifier`` does."""
    if debugging():
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    logging.getLogger(MLFLOW_ENVIRONMENT_LOGGER).addFilter(_DropPipVersionWarning())
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
