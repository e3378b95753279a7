"""The prediction log: one JSON line per image the server classified, rotated, bounded.

Each line holds the time (UTC), the model name and version, the class (null where the
model abstained, with the reason), the most likely class index, the confidence, the OOD
score, the request's latency and batch size, and the SHA-256 digest of the pixels the
model saw; the image itself (a base64 PNG of those pixels) only with ``serve.log_images``.

The log is ``predictions.jsonl`` in one folder, named by the server's configuration and
never by a request: nothing a client sends becomes part of a path. The stdlib's
``RotatingFileHandler`` rotates it at ``max_bytes`` into ``predictions.jsonl.1``, ``.2``...,
keeping ``backups`` old files, so the folder holds at most ``max_bytes * (backups + 1)``
bytes, however large one request is: each line is its own write, and the handler rotates
before a line that would pass ``max_bytes``. The server scores one request at a time, on
one thread, so there is one writer.

:func:`read_window` reads the newest lines back, oldest first, across the rotated files
(``python -m tools.monitor``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import logging
import logging.handlers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOG_FILE = "predictions.jsonl"

log = logging.getLogger(__name__)


class LogFolderError(ValueError):
    """The prediction log's folder or file cannot be used safely."""


def log_path(folder: Path) -> Path:
    """The current log file in ``folder``; refused if it is a link (it could point anywhere)."""
    path = Path(folder) / LOG_FILE
    if path.is_symlink():
        raise LogFolderError(f"{path}: is a symbolic link; the prediction log must be a file")
    return path


def digest(pixels: np.ndarray) -> str:
    """``sha256:<hex>`` of an image's uint8 pixels and shape: the same image, the same digest,
    whether it came as a PNG or as an array."""
    hasher = hashlib.sha256(str(pixels.shape).encode())
    hasher.update(np.ascontiguousarray(pixels).tobytes())
    return f"sha256:{hasher.hexdigest()}"


def png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class PredictionLog:
    """Appends the predictions of each request to ``folder/predictions.jsonl``."""

    def __init__(
        self, folder: Path, *, max_bytes: int, backups: int, keep_images: bool = False
    ) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = log_path(self.folder)
        self.keep_images = keep_images
        self.handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        # A logger of its own, not the root's: nothing else writes here, and lines go nowhere else.
        self.logger = logging.getLogger(f"{__name__}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def append(
        self,
        model: dict[str, Any],
        images: np.ndarray,
        rows: Sequence[dict[str, Any]],
        latency_seconds: float,
    ) -> None:
        """One line per image of a request: ``rows`` are the model's answers for ``images``."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        lines = []
        for pixels, row in zip(images, rows, strict=True):
            record = {
                "time": now,
                **model,
                "class_name": row["class_name"],
                "class_index": row["class_index"],
                "confidence": round(row["confidence"], 6),
                "ood_score": None if row["ood_score"] is None else round(row["ood_score"], 4),
                "abstain_reason": row["abstain_reason"],
                "latency_ms": round(latency_seconds * 1000, 3),
                "batch_size": len(rows),
                "digest": digest(pixels),
            }
            if self.keep_images:
                record["image"] = png_base64(pixels)
            lines.append(json.dumps(record))
        for line in lines:
            self.logger.info(line)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def _log_files(folder: Path) -> list[Path]:
    """The log's files, oldest first: the highest-numbered backup to the current file."""
    current = log_path(folder)
    backups = sorted(
        (
            path
            for path in Path(folder).glob(f"{LOG_FILE}.*")
            if path.suffix[1:].isdigit() and not path.is_symlink()
        ),
        key=lambda path: int(path.suffix[1:]),
        reverse=True,
    )
    return [*backups, *([current] if current.exists() else [])]


def _records(folder: Path, unreadable: list[int]) -> Iterator[dict[str, Any]]:
    """Every record of the log, oldest first; a line that is not a JSON object of UTF-8 text
    (cut short by a crash mid-write, or damaged by hand) is skipped and counted."""
    for path in _log_files(folder):
        with path.open("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
                    record = None
                if isinstance(record, dict) and isinstance(record.get("time"), str):
                    yield record
                elif line.strip():
                    unreadable[0] += 1


def read_window(
    folder: Path,
    last: int,
    *,
    since: datetime.datetime | None = None,
    model: str | None = None,
    version: int | None = None,
) -> list[dict[str, Any]]:
    """The newest ``last`` records (oldest first), of ``model`` version ``version`` where
    given, at or after ``since``."""
    if not Path(folder).is_dir():
        raise LogFolderError(f"{folder}: no prediction log here; serve some requests first")
    window: list[dict[str, Any]] = []
    unreadable = [0]
    for record in _records(folder, unreadable):
        if model is not None and record.get("model") != model:
            continue
        if version is not None and record.get("version") != version:
            continue
        if since is not None and _time_of(record) < since:
            continue
        window.append(record)
        if len(window) > 2 * last:
            del window[:-last]
    if unreadable[0]:
        log.warning("%s: skipped %d unreadable lines of the prediction log", folder, unreadable[0])
    return window[-last:]


def _time_of(record: dict[str, Any]) -> datetime.datetime:
    """The record's time; one that cannot be read sorts first (it is never "since")."""
    try:
        return datetime.datetime.fromisoformat(record["time"])
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)
