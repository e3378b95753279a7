"""Export a trained Keras model into deployable formats and prove each gives the same answers.

Every format takes what the ``.keras`` model takes, raw uint8 pixels ``(N, H, W, C)``, and
returns float32 class probabilities ``(N, classes)``:

    keras           the trained ``.keras`` file itself
    saved_model     TensorFlow SavedModel, for TF Serving (signature ``serve``)
    tflite_float32  LiteRT (TFLite) with float32 weights
    tflite_int8     LiteRT with full-integer quantisation: int8 weights and activations,
                    calibrated on training images; under a third of the float32 size
    onnx            ONNX, for onnxruntime and the runtimes that read it

A float format must give the same probabilities as the ``.keras`` model to within
``FLOAT_TOLERANCE``; the int8 model may differ in its probabilities but must not lose more
than ``INT8_MAX_ACCURACY_DROP`` of accuracy. TensorFlow is imported inside the functions:
this is export code, and the model code stays backend-neutral.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from classifier.errors import DataError, StageError
from classifier.quiet import native_stderr_filtered
from classifier.serving import runtime

log = logging.getLogger(__name__)

FORMATS = ("keras", "saved_model", "tflite_float32", "tflite_int8", "onnx")
FILE_NAMES = {
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
}
FLOAT_TOLERANCE = 1e-5  # max abs probability difference for float formats
INT8_MAX_ACCURACY_DROP = 0.005  # 0.5 points
# Calibration sees at most this many training images, evenly spaced through the set; a few
# hundred pin down each layer's value range, and more only slow the conversion.
MAX_CALIBRATION_IMAGES = 500
PREDICT_BATCH_SIZE = 256
# Python loggers that report every step of a conversion at INFO.
CONVERTER_LOGGERS = ("tensorflow", "tf2onnx")
NUMPY_OBJECT_PROBE = r"In the future `np\.object` will be defined"

Runner = Callable[[np.ndarray], np.ndarray]


class ExportError(StageError):
    """A model could not be converted to, or loaded from, one of the formats."""


class ParityError(StageError):
    """An exported format does not give the answers the Keras model gives."""


@contextlib.contextmanager
def _quiet_converters() -> Iterator[None]:
    """Quiet the converters' step-by-step INFO logs and a known NumPy warning, then restore."""
    loggers = [logging.getLogger(name) for name in CONVERTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Keras's tf2onnx shim probes ``hasattr(np, "object")``, which NumPy 2 warns about.
            warnings.filterwarnings("ignore", NUMPY_OBJECT_PROBE, FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _batch_shape(image_shape: tuple) -> str:
    """``(N, 28, 28, 1)`` for messages."""
    return "(N, " + ", ".join(str(size) for size in image_shape) + ")"


def _calibration_images(representative_images: np.ndarray, image_shape: tuple) -> np.ndarray:
    """Up to MAX_CALIBRATION_IMAGES of ``representative_images``, checked against the model."""
    images = np.asarray(representative_images)
    if images.dtype != np.uint8 or images.shape[1:] != image_shape or len(images) == 0:
        raise DataError(
            f"tflite_int8: calibration needs at least one uint8 image of shape "
            f"{_batch_shape(image_shape)}, got {images.dtype} {images.shape}"
        )
    count = min(len(images), MAX_CALIBRATION_IMAGES)
    return images[np.linspace(0, len(images) - 1, count).round().astype(int)]


def export_formats(
    keras_path: Path, representative_images: np.ndarray, out_dir: Path
) -> dict[str, Path]:
    """Write every format of the ``.keras`` model into ``out_dir``; return format -> path.

    ``keras`` maps to ``keras_path`` itself (not copied); the others are converted from the
    model loaded from it, so every format comes from that one file. ``representative_images``
    (training images, uint8) calibrate the int8 model's value ranges.
    """
    import tensorflow as tf

    from classifier.model.files import load_model

    model = load_model(str(keras_path))
    input_spec = model.inputs[0]
    image_shape = tuple(input_spec.shape[1:])
    if input_spec.dtype != "uint8" or len(image_shape) != 3:
        raise ExportError(
            f"{keras_path}: the model must take uint8 pixels (N, height, width, channels), "
            f"takes {input_spec.dtype} {tuple(input_spec.shape)}"
        )
    calibration = _calibration_images(representative_images, image_shape)

    def calibration_samples() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[np.newaxis]]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / file_name for name, file_name in FILE_NAMES.items()}
    for name, options in _conversions(tf, calibration_samples).items():
        if options["format"] == "litert":  # after saved_model, which the dict lists first
            _convert(paths["saved_model"], name, paths[name], options, keras_path)
        else:
            _convert(model, name, paths[name], options, keras_path)
    return {"keras": Path(keras_path), **paths}


def _conversions(tf: Any, calibration_samples: Callable | None) -> dict[str, dict[str, Any]]:
    """``model.export`` options of each format (int8 only with calibration samples)."""
    conversions: dict[str, dict[str, Any]] = {
        "saved_model": {"format": "tf_saved_model"},
        # Builtin ops only: a file that needs TensorFlow (Flex) ops would not run on LiteRT alone.
        "tflite_float32": {
            "format": "litert",
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
        },
        # Full-integer: every op int8, or conversion fails. The input stays uint8 pixels
        # (the model's own input type); the output is dequantised to float32 probabilities.
        "tflite_int8": {
            "format": "litert",
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": calibration_samples,
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        },
        "onnx": {"format": "onnx"},
    }
    if calibration_samples is None:
        del conversions["tflite_int8"]
    return conversions


def _convert(model: Any, name: str, path: Path, options: dict[str, Any], source: Path) -> None:
    """``model.export`` to ``path``; ``model`` may also be a SavedModel folder written from
    the model, which a ``litert`` conversion then reads instead of writing its own."""
    log.info("exporting %s to %s", name, path)
    try:
        with _quiet_converters():
            if isinstance(model, Path):
                Path(path).write_bytes(_litert_from_saved_model(model, options))
            else:
                model.export(str(path), verbose=False, **options)
    except Exception as error:
        raise ExportError(
            f"{name}: converting {source} failed: {str(error).strip().splitlines()[0]}"
        ) from error


def _litert_from_saved_model(saved_model: Path, options: dict[str, Any]) -> bytes:
    """The TFLite bytes ``model.export(format="litert", **options)`` gives, converted from
    ``saved_model`` (the model's own ``tf_saved_model`` export).

    Keras's litert export writes the model out as a SavedModel once more, to a temporary
    folder, and converts that: the same bytes, for twice the time (photo_resnet at 64x64:
    5.6 and 6.3 s per TFLite file, 2.8 and 3.3 s from the SavedModel). The converter is
    set up as keras/src/export/litert.py sets it, then given the format's options.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    converter.experimental_enable_resource_variables = True
    for key, value in options.items():
        if key == "target_spec":
            for spec_key, spec_value in value.items():
                setattr(converter.target_spec, spec_key, spec_value)
        elif key != "format":
            setattr(converter, key, value)
    with native_stderr_filtered():  # its fully_quantize notice (classifier/quiet.py)
        return converter.convert()


def export_with_features(keras_path: Path, fmt: str, path: Path) -> Path:
    """Convert the ``.keras`` model to the float format ``fmt`` at ``path``, with a second
    output: its penultimate features (``features``, beside ``probabilities``), which the
    served model's out-of-distribution score needs. Same converter and options as the
    format's own file, so the same parity bound applies."""
    import tensorflow as tf

    from classifier.model.files import load_model

    if fmt not in runtime.FAST_FORMATS:
        raise ExportError(f"{fmt}: only {list(runtime.FAST_FORMATS)} are served with features")
    model = load_model(str(keras_path))
    try:
        two_outputs = runtime.with_features(model)
    except runtime.RuntimeLoadError as error:
        raise ExportError(f"{keras_path}: {error}") from None
    # A functional model built from another one is called once before it can be exported.
    two_outputs([np.zeros((1, *model.inputs[0].shape[1:]), dtype=np.uint8)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _convert(two_outputs, fmt, Path(path), _conversions(tf, None)[fmt], keras_path)
    return Path(path)


def _checked(fmt: str, image_shape: tuple, predict: Runner) -> Runner:
    """Wrap ``predict`` to refuse anything but a uint8 batch of the model's image shape."""

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != image_shape:
            raise DataError(
                f"{fmt}: expected uint8 images of shape {_batch_shape(image_shape)}, "
                f"got {images.dtype} {images.shape}"
            )
        return np.asarray(predict(images), dtype=np.float32)

    return run


def _keras_runner(path: Path) -> Runner:
    from classifier.model.files import load_model
    from classifier.model.predict import predict

    model = load_model(str(path))

    def run(images: np.ndarray) -> np.ndarray:
        return predict(model, images, PREDICT_BATCH_SIZE)

    return _checked("keras", tuple(model.inputs[0].shape[1:]), run)


def _saved_model_runner(path: Path) -> Runner:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    ((input_name, input_spec),) = serve.structured_input_signature[1].items()
    (output_name,) = serve.structured_outputs

    def predict(images: np.ndarray) -> np.ndarray:
        return serve(**{input_name: tf.constant(images)})[output_name].numpy()

    return _checked("saved_model", tuple(input_spec.shape[1:]), predict)


def _from_runtime(fmt: str, load: Callable[[], runtime.Runtime]) -> Runner:
    """A runner of the probabilities of a file the serving runtime loads (one implementation
    for export and serving: classifier/serving/runtime.py)."""
    try:
        loaded = load()
    except runtime.RuntimeLoadError as error:
        raise ExportError(str(error)) from None

    def predict(images: np.ndarray) -> np.ndarray:
        return loaded.run(images)[runtime.PROBABILITIES]

    return _checked(fmt, loaded.input_shape, predict)


def _tflite_runner(
    fmt: str, path: Path, num_threads: int | None, xnnpack: bool, remember_shape: bool
) -> Runner:
    return _from_runtime(
        fmt, lambda: runtime.litert(fmt, path, num_threads, xnnpack, remember_shape)
    )


def _onnx_runner(path: Path, session_options: Any | None) -> Runner:
    return _from_runtime("onnx", lambda: runtime.onnx(path, session_options))


def load_runner(
    fmt: str,
    path: Path,
    *,
    num_threads: int | None = None,
    xnnpack: bool = True,
    remember_shape: bool = False,
    session_options: Any | None = None,
) -> Runner:
    """A function from a uint8 batch ``(N, H, W, C)`` to float32 probabilities, any N.

    keras: safe-mode load; saved_model: its ``serve`` signature; tflite_*: the LiteRT
    interpreter on every CPU; onnx: onnxruntime on the CPU.

    The keyword arguments tune one runtime each; their defaults are what the pipeline uses,
    and the benchmarks vary them one at a time (benchmarks/inference.py):

    - ``num_threads`` (tflite_*): LiteRT's thread count; None: one per CPU (``os.cpu_count()``).
    - ``xnnpack`` (tflite_*): False loads the interpreter without its default XNNPACK
      delegate (``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``).
    - ``remember_shape`` (tflite_*): True keeps the batch shape the runner last sized the
      input for, instead of asking the interpreter for it on every call.
    - ``session_options`` (onnx): an ``onnxruntime.SessionOptions`` for the session;
      None: onnxruntime's defaults.

    A knob given for a format it does not apply to is an :class:`ExportError`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}, expected one of {list(FORMATS)}")
    tflite_knobs = {
        "num_threads": num_threads is not None,
        "xnnpack": not xnnpack,
        "remember_shape": remember_shape,
    }
    tflite = fmt.startswith("tflite_")
    misplaced = [name for name, given in tflite_knobs.items() if given and not tflite]
    if session_options is not None and fmt != "onnx":
        misplaced.append("session_options")
    if misplaced:
        raise ExportError(f"{fmt}: cannot set {', '.join(misplaced)} for this format")
    if num_threads is not None and num_threads < 1:
        raise ExportError(f"{fmt}: num_threads must be at least 1, got {num_threads}")
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{fmt}: {path} does not exist; export the formats first")
    try:
        if fmt == "keras":
            return _keras_runner(path)
        if fmt == "saved_model":
            return _saved_model_runner(path)
        if fmt == "onnx":
            return _onnx_runner(path, session_options)
        return _tflite_runner(fmt, path, num_threads, xnnpack, remember_shape)
    except StageError:
        raise
    except Exception as error:
        raise ExportError(
            f"{fmt}: cannot load {path}: {str(error).strip().splitlines()[0]}"
        ) from error


def parity_bound(fmt: str, int8_max_drop: float = INT8_MAX_ACCURACY_DROP) -> tuple[str, float]:
    """The figure a format is judged on and its largest passing value."""
    if fmt == "tflite_int8":
        return "accuracy_drop", int8_max_drop
    return "max_abs_diff", FLOAT_TOLERANCE


def _predict_in_batches(runner: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    batches = [
        runner(images[start : start + batch_size]) for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


QUANTISED = ("tflite_int8",)
INT8_ALPHA = 0.05


def _real_loss(reference_right: np.ndarray, format_right: np.ndarray) -> dict[str, float]:
    """Images the format loses and gains against the reference, and McNemar's exact one-sided
    p-value that it really is worse (a binomial test of the losses among the changes)."""
    from scipy.stats import binomtest

    lost = int(np.sum(reference_right & ~format_right))
    gained = int(np.sum(format_right & ~reference_right))
    changed = lost + gained
    p_value = 1.0 if changed == 0 else binomtest(lost, changed, 0.5, "greater").pvalue
    return {"lost_images": lost, "gained_images": gained, "p_value": float(p_value)}


def check_parity(
    reference: np.ndarray,
    runners: Mapping[str, Runner],
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = PREDICT_BATCH_SIZE,
    int8_max_drop: float = INT8_MAX_ACCURACY_DROP,
    int8_alpha: float = INT8_ALPHA,
) -> dict[str, dict[str, float | bool]]:
    """Score each format's probabilities on ``images`` against the Keras ``reference``.

    Per format: ``max_abs_diff`` from the reference probabilities, ``accuracy``,
    ``accuracy_drop`` (reference accuracy minus the format's), the ``bound`` and
    ``passed``, judged on the figure :func:`parity_bound` names. A float format passes
    within the tolerance. A quantised one fails only when its drop exceeds the bound *and*
    the drop is real: McNemar's exact test on the images where the two disagree says so at
    ``int8_alpha``. On 270 test images one image is 0.37 points: two images lost out of two
    changed is over a 0.5-point bound, but no evidence of anything (p = 0.25).
    """
    if len(images) == 0 or reference.shape[0] != len(images) or labels.shape != (len(images),):
        raise DataError(
            f"parity needs one reference row and one label per image, got {len(images)} images, "
            f"reference {reference.shape}, labels {labels.shape}"
        )
    # Accuracies as counts over one division, so a drop of exactly the bound passes.
    reference_correct = int(np.sum(reference.argmax(axis=1) == labels))
    report: dict[str, dict[str, float | bool]] = {}
    for fmt, runner in runners.items():
        if fmt not in FORMATS:
            raise ExportError(f"unknown format {fmt!r}, expected one of {list(FORMATS)}")
        probabilities = _predict_in_batches(runner, images, batch_size)
        if probabilities.shape != reference.shape:
            raise ParityError(
                f"{fmt}: gave probabilities of shape {probabilities.shape}, "
                f"the Keras model {reference.shape}"
            )
        correct = int(np.sum(probabilities.argmax(axis=1) == labels))
        accuracy = correct / len(images)
        figures: dict[str, float | bool] = {
            "max_abs_diff": float(np.max(np.abs(probabilities - reference))),
            "accuracy": accuracy,
            "accuracy_drop": (reference_correct - correct) / len(images),
        }
        figure, bound = parity_bound(fmt, int8_max_drop)
        figures["bound"] = bound
        figures["passed"] = bool(figures[figure] <= bound)
        if fmt in QUANTISED:
            reference_right = reference.argmax(axis=1) == labels
            figures.update(_real_loss(reference_right, probabilities.argmax(axis=1) == labels))
            figures["alpha"] = int8_alpha
            figures["passed"] = bool(figures["passed"] or figures["p_value"] >= int8_alpha)
        report[fmt] = figures
        log.info(
            "%s: %s %.3g (bound %g), accuracy %.4f", fmt, figure, figures[figure], bound, accuracy
        )
    return report


def failure(fmt: str, figures: Mapping[str, float | bool]) -> str:
    """Why ``fmt`` failed parity, in words."""
    figure, default_bound = parity_bound(fmt)
    reason = f"{fmt} {figure} {figures[figure]:.3g} > {figures.get('bound', default_bound):g}"
    if "p_value" in figures:
        reason += (
            f", and real: {figures['lost_images']} test images lost, {figures['gained_images']} "
            f"gained (McNemar exact p={figures['p_value']:.3g} < {figures['alpha']:g})"
        )
    return reason


def assert_parity(
    report: Mapping[str, Mapping[str, float | bool]], *, require_quantised: bool = True
) -> None:
    """Raise :class:`ParityError` naming every format that failed, its figure and the bound.

    A quantised format that failed is left to the caller (left out) unless
    ``require_quantised``.
    """
    failures = [
        failure(fmt, figures)
        for fmt, figures in report.items()
        if not figures["passed"] and (require_quantised or fmt not in QUANTISED)
    ]
    if failures:
        raise ParityError("exported formats differ from the Keras model: " + "; ".join(failures))


def format_sizes(paths: Mapping[str, Path]) -> dict[str, int]:
    """Size in bytes of each format's file, or of all files under its directory."""
    sizes = {}
    for fmt, path in paths.items():
        path = Path(path)
        if path.is_dir():
            sizes[fmt] = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
        elif path.is_file():
            sizes[fmt] = path.stat().st_size
        else:
            raise ExportError(f"{fmt}: {path} does not exist; export the formats first")
    return sizes


# Training images that calibrate the int8 model's quantisation ranges.
REPRESENTATIVE_IMAGES = 300


def representative_images(
    train_images: np.ndarray, count: int = REPRESENTATIVE_IMAGES
) -> np.ndarray:
    """``count`` training images drawn by a fixed seed, to calibrate the int8 model."""
    return train_images[np.random.default_rng(0).permutation(len(train_images))[:count]]


def export_and_check(
    model_path: Path,
    representative: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    reference: np.ndarray,
    out_dir: Path,
    int8_max_drop: float = INT8_MAX_ACCURACY_DROP,
    int8_alpha: float = INT8_ALPHA,
    require_int8: bool = False,
) -> dict[str, dict[str, float | bool]]:
    """Write every format into ``out_dir`` and check each on the test images.

    ``reference`` is the Keras model's probabilities for the test images. Returns each
    format's size, largest probability difference, accuracy, whether it is ``shipped`` and,
    if not, why. Raises :class:`ParityError` if a float format gives different answers, or
    the int8 one does and ``require_int8``; an int8 model that fails is removed from
    ``out_dir`` instead, so it is never shipped.
    """
    paths = export_formats(model_path, representative, out_dir)
    runners = {name: load_runner(name, path) for name, path in paths.items()}
    report = check_parity(
        reference,
        runners,
        test_images,
        test_labels,
        int8_max_drop=int8_max_drop,
        int8_alpha=int8_alpha,
    )
    for name, size in format_sizes(paths).items():
        report[name]["size_bytes"] = size
    assert_parity(report, require_quantised=require_int8)
    for name, figures in report.items():
        figures["shipped"] = bool(figures["passed"])
        if not figures["passed"]:
            figures["reason"] = f"left out: {failure(name, figures)}"
            log.warning("%s is not shipped: %s", name, figures["reason"])
            paths[name].unlink()
    return report
