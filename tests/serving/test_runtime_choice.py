"""Which runtime the served model runs on: serve.runtime, against export's parity report."""

import pytest

from classifier.serving import runtime


def test_auto_serves_litert_then_onnx_then_keras_and_a_named_failure_is_refused():
    passed = {"passed": True, "shipped": True}
    failed = {"passed": False, "shipped": False}
    both = {"tflite_float32": passed, "onnx": passed, "tflite_int8": passed}
    assert runtime.choose(both, "auto") == "tflite_float32"
    assert runtime.choose({**both, "tflite_float32": failed}, "auto") == "onnx"
    # An int8 file never serves: it is not within the float bound.
    no_float = {"tflite_float32": failed, "onnx": failed, "tflite_int8": passed}
    assert runtime.choose(no_float, "auto") == "keras"
    assert runtime.choose(both, "onnx") == "onnx"
    assert runtime.choose(no_float, "keras") == "keras"
    with pytest.raises(runtime.RuntimeLoadError, match="onnx did not pass parity at export"):
        runtime.choose(no_float, "onnx")
