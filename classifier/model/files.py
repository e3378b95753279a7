"""Load ``.keras`` model files without trusting them: safe mode, and only the zip format.

Serving loads through here too, so this module imports nothing from training.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from classifier.errors import StageError

if TYPE_CHECKING:
    import keras


class ModelFileError(StageError):
    """A model file is missing, is not a ``.keras`` archive, or cannot be loaded safely."""


# The first bytes of an HDF5 file: Keras' legacy format, which safe mode did not cover
# before Keras 3.11.3 (CVE-2025-9905). Only the .keras zip format is loaded.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PICKLE_PROTOCOL_BYTE = 0x80
KERAS_CONFIG = "config.json"
REASON_MAX_CHARS = 300


def _not_a_keras_archive(model_path: Path) -> str | None:
    """Why ``model_path`` is not a ``.keras`` zip archive, or None if it looks like one."""
    if not model_path.exists():
        return "no such file"
    if not model_path.is_file():
        return "not a file"
    with model_path.open("rb") as file:
        head = file.read(len(HDF5_SIGNATURE))
    if head.startswith(HDF5_SIGNATURE):
        return "an HDF5 (.h5) file, not a .keras archive; the legacy HDF5 format is not loaded"
    if head[:1] == bytes([PICKLE_PROTOCOL_BYTE]):
        return "a Python pickle, not a .keras archive; pickles are never loaded"
    if not zipfile.is_zipfile(model_path):
        return "not a .keras archive (not a zip file: empty, truncated or another format)"
    try:
        with zipfile.ZipFile(model_path) as archive:
            if KERAS_CONFIG not in archive.namelist():
                return f"a zip file without {KERAS_CONFIG}, not a .keras archive"
    except (zipfile.BadZipFile, OSError) as error:
        return f"a corrupt .keras archive ({error})"
    return None


def _innermost_reason(error: BaseException) -> str:
    """The first sentence of the deepest error in the chain: Keras wraps the telling one."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    sentence = first.split(". ", 1)[0].rstrip(".")
    if len(sentence) > REASON_MAX_CHARS:
        sentence = sentence[: REASON_MAX_CHARS - 3] + "..."
    return sentence


def load_model(path: str) -> keras.Model:
    """Load a ``.keras`` model with safe mode on: no pickled or Lambda code is run.

    Anything else is refused with a ModelFileError naming the file and why, never a raw
    Keras error: an HDF5 or pickle file, a truncated archive, or a config that asks for a
    Python lambda or for code outside Keras (CVE-2025-1550, CVE-2025-8747, CVE-2025-9906).
    """
    model_path = Path(path)
    problem = _not_a_keras_archive(model_path)
    if problem is not None:
        raise ModelFileError(f"{model_path}: {problem}")
    try:
        import keras

        return keras.saving.load_model(model_path, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError, zip and h5 errors
        raise ModelFileError(
            f"{model_path}: cannot load this model safely: {_innermost_reason(error)}"
        ) from error
