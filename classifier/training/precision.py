"""Which precision training computes in, and a float32 model to save whatever it was.

With ``train.precision: auto`` the model computes in bfloat16 (variables stay float32) on
CPUs with bf16 matrix instructions, read from ``/proc/cpuinfo``. The saved model is always
rebuilt in float32 with the trained weights, so export and serving see a plain float32
model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras

from classifier.config import TrainParams
from classifier.model.architectures import build_model

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags of CPUs with native bfloat16 matrix products (Intel AMX since
# Sapphire Rapids, AVX512_BF16 since Cooper Lake, AMD Zen 4): there bf16 is about twice as
# fast as float32 at the same accuracy; elsewhere it is emulated and slower.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether ``cpuinfo`` (Linux /proc/cpuinfo text) lists a native bfloat16 flag."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    """The Keras dtype policy for ``train.precision``: ``auto`` asks the CPU.

    Without /proc/cpuinfo (macOS, Windows) auto means float32.
    """
    if precision != "auto":
        return precision
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    return MIXED_BFLOAT16 if cpu_has_bf16(cpuinfo) else FLOAT32


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name``, then restore the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32_model(
    model: keras.Model, cfg: TrainParams, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """A fresh float32 copy of ``model`` with its weights: what is saved and served.

    Export converts the saved model to TFLite and ONNX and checks them against Keras to
    1e-5, so the saved model must be plain float32 whatever precision trained it. The copy
    is not compiled either: the saved file then holds no loss or optimizer of the training
    code's own, and loads where that code is not (a registered model, say).
    """
    with dtype_policy(FLOAT32):
        plain = build_model(cfg.architecture, input_shape, num_classes)
    # Frozen layers list their weights after the trainable ones: unfreeze everything (the
    # training is over) so that both models list their weights in the same order.
    model.trainable = True
    plain.set_weights(model.get_weights())
    return plain
