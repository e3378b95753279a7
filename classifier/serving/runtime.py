"""Run an exported model file without TensorFlow: ONNX Runtime, LiteRT, or Keras as the fallback.

The served model and the export checks share these runners (classifier/export/formats.py
wraps them), so the code that checked a file at export is the code that serves it. A
runner takes a uint8 batch ``(N, H, W, C)`` and returns its outputs by name:
``probabilities`` always, and ``features`` (the penultimate layer, the input of the last
Dense layer) where the file has them. A file with one output gives it as
``probabilities``: the exported formats in ``models/formats`` have only that one.

Each runtime is imported inside the function that loads it, so a served model that runs
on LiteRT never imports ONNX Runtime, and neither imports TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier.quiet import native_stderr_filtered

PROBABILITIES = "probabilities"
FEATURES = "features"
# The float formats a served model can run on, fastest first: benchmarks/inference.py
# measured LiteRT (XNNPACK) ahead of ONNX Runtime at batch 1 and at batch 256.
FAST_FORMATS = ("tflite_float32", "onnx")
KERAS = "keras"
# The Keras layer a calibrated model divides its logits in (classifier/model/temperature.py,
# not imported: it imports Keras, which the fast path never needs).
TEMPERATURE_LAYER = "temperature"

Outputs = dict[str, np.ndarray]


class RuntimeLoadError(ValueError):
    """A model file that cannot run here: a missing runtime, a wrong input, a broken file."""


@dataclass(frozen=True)
class Runtime:
    """A loaded model: which format, the image shape it takes, and the function to run it."""

    fmt: str
    input_shape: tuple[int, int, int]
    run: Callable[[np.ndarray], Outputs]
    output_names: tuple[str, ...] = (PROBABILITIES,)
    temperature: float | None = None  # known where the runtime is the Keras model itself

    @property
    def has_features(self) -> bool:
        return FEATURES in self.output_names


def _named(names: list[str]) -> list[str]:
    """Output names as this module calls them: a single output is the probabilities."""
    return [PROBABILITIES] if len(names) == 1 else names


def onnx(path: Path, session_options: Any | None = None) -> Runtime:
    """``path`` on ONNX Runtime's CPU provider (its own defaults: the fastest measured)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), session_options, providers=["CPUExecutionProvider"]
    )
    (model_input,) = session.get_inputs()
    output_names = [output.name for output in session.get_outputs()]
    names = _named(output_names)

    def run(images: np.ndarray) -> Outputs:
        values = session.run(output_names, {model_input.name: images})
        return dict(zip(names, values, strict=True))

    shape = tuple(int(size) for size in model_input.shape[1:])
    return Runtime("onnx", shape, run, tuple(names))  # type: ignore[arg-type]


def _dequantised(values: np.ndarray, detail: Mapping) -> np.ndarray:
    """Float values of a TFLite output; integer outputs carry a (scale, zero point)."""
    scale, zero_point = detail["quantization"]
    if values.dtype == np.float32 or scale == 0:
        return values
    return (values.astype(np.float32) - zero_point) * scale


def litert(
    fmt: str,
    path: Path,
    num_threads: int | None = None,
    xnnpack: bool = True,
    remember_shape: bool = False,
) -> Runtime:
    """``path`` on the LiteRT interpreter; outputs named by the file's signature.

    ``num_threads``: None is one per CPU. ``xnnpack``: False loads the interpreter without
    its default XNNPACK delegate. ``remember_shape``: keep the batch shape last sized for
    instead of asking the interpreter on every call.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (
        {}
        if xnnpack
        else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    interpreter = Interpreter(
        model_path=str(path), num_threads=num_threads or os.cpu_count(), **resolver
    )
    (input_detail,) = interpreter.get_input_details()
    if input_detail["dtype"] != np.uint8 or input_detail["quantization"][0] != 0:
        raise RuntimeLoadError(
            f"{fmt}: {path} must take raw uint8 pixels, takes "
            f"{input_detail['dtype'].__name__} quantised as {input_detail['quantization']}"
        )
    details = interpreter.get_output_details()
    if len(details) == 1:
        outputs = {PROBABILITIES: details[0]}
    else:  # a file with several outputs names them in its signature
        by_name = interpreter.get_signature_runner().get_output_details()
        index_of = {detail["index"]: detail for detail in details}
        outputs = {name: index_of[detail["index"]] for name, detail in by_name.items()}
    sized_for = [tuple(input_detail["shape"])]

    def run(images: np.ndarray) -> Outputs:
        # The interpreter holds one batch size at a time; resize only when it changes.
        current = (
            sized_for[0] if remember_shape else tuple(interpreter.get_input_details()[0]["shape"])
        )
        if current != images.shape:
            interpreter.resize_tensor_input(input_detail["index"], images.shape, strict=True)
            interpreter.allocate_tensors()
            sized_for[0] = images.shape
        interpreter.set_tensor(input_detail["index"], images)
        interpreter.invoke()
        return {
            name: _dequantised(interpreter.get_tensor(detail["index"]), detail)
            for name, detail in outputs.items()
        }

    with native_stderr_filtered():  # the XNNPACK notice, once per process (classifier/quiet.py)
        interpreter.allocate_tensors()
    shape = tuple(int(size) for size in input_detail["shape"][1:])
    return Runtime(fmt, shape, run, tuple(outputs))  # type: ignore[arg-type]


def features_layer(model: Any) -> Any:
    """The model's last Dense layer (the logits, or a softmax head): its input is the
    penultimate features; None if the model has no Dense layer."""
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return dense[-1] if dense else None


def with_features(model: Any) -> Any:
    """``model`` with two named outputs: its probabilities and its penultimate features."""
    import keras

    head = features_layer(model)
    if head is None:
        raise RuntimeLoadError(f"model {model.name!r} has no Dense layer: no penultimate features")
    outputs = {PROBABILITIES: model.outputs[0], FEATURES: head.input}
    return keras.Model(model.inputs, outputs, name=model.name)


def temperature_of(model: Any) -> float:
    """The temperature built into a Keras model; 1.0 if it has none."""
    try:
        return 1.0 / float(model.get_layer(TEMPERATURE_LAYER).scale)
    except ValueError:
        return 1.0


def keras_model(path: Path) -> Runtime:
    """The ``.keras`` file (safe mode) with its features; ``predict_on_batch`` runs a compiled
    function, several times faster than a direct call for one image."""
    from classifier.model.files import load_model

    model = load_model(str(path))
    temperature = temperature_of(model)
    names: tuple[str, ...] = (PROBABILITIES,)
    if features_layer(model) is not None:  # else probabilities only, and no OOD score
        model = with_features(model)
        names = (PROBABILITIES, FEATURES)

    def run(images: np.ndarray) -> Outputs:
        outputs = model.predict_on_batch(images)
        if not isinstance(outputs, dict):
            return {PROBABILITIES: np.asarray(outputs)}
        return {name: np.asarray(value) for name, value in outputs.items()}

    shape = tuple(int(size) for size in model.inputs[0].shape[1:])
    return Runtime(KERAS, shape, run, names, temperature)  # type: ignore[arg-type]


def load(fmt: str, path: Path, **knobs: Any) -> Runtime:
    """``path`` in format ``fmt`` on its runtime (``keras``, ``onnx`` or ``tflite_*``)."""
    if fmt == KERAS:
        return keras_model(path)
    if fmt == "onnx":
        return onnx(path, **knobs)
    if fmt.startswith("tflite_"):
        return litert(fmt, path, **knobs)
    raise RuntimeLoadError(f"no runtime for format {fmt!r}")


def choose(report: Mapping[str, Mapping[str, Any]], wanted: str = "auto") -> str:
    """The format to serve: ``wanted``, or with ``auto`` the fastest float format that
    passed parity and ships (FAST_FORMATS), else Keras."""
    if wanted == KERAS:
        return KERAS
    candidates = FAST_FORMATS if wanted == "auto" else (wanted,)
    for fmt in candidates:
        figures = report.get(fmt, {})
        if figures.get("passed") and figures.get("shipped", True):
            return fmt
    if wanted != "auto":
        raise RuntimeLoadError(f"{wanted} did not pass parity at export, so it cannot be served")
    return KERAS
