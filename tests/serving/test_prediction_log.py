"""The prediction log: one JSON line per image, rotated and bounded, read back in order."""

import json
import os

import numpy as np
import pytest

from classifier.serving.prediction_log import (
    LOG_FILE,
    LogFolderError,
    PredictionLog,
    digest,
    read_window,
)

MODEL = {"model": "digits-cnn", "version": 3}


def rows(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "class_name": None if index % 5 == 0 else str(index % 10),
            "class_index": index % 10,
            "confidence": 0.5 + (index % 50) / 100,
            "ood_score": 3.0 + index,
            "abstain_reason": "low_confidence" if index % 5 == 0 else None,
        }
        for index in range(start, start + count)
    ]


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28, 1), dtype=np.uint8)


def test_each_image_is_one_line_with_a_digest_and_not_the_image(tmp_path):
    log = PredictionLog(tmp_path / "log", max_bytes=10**6, backups=2)
    batch = images(3)
    log.append(MODEL, batch, rows(3), latency_seconds=0.0021)
    log.close()
    lines = (tmp_path / "log" / LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert set(records[0]) == {
        "time", "model", "version", "class_name", "class_index", "confidence", "ood_score",
        "abstain_reason", "latency_ms", "batch_size", "digest",
    }  # fmt: skip
    assert records[0]["class_name"] is None and records[0]["abstain_reason"] == "low_confidence"
    assert [r["digest"] for r in records] == [digest(image) for image in batch]
    assert records[1]["latency_ms"] == 2.1 and records[1]["batch_size"] == 3
    assert records[2]["version"] == 3


def test_the_image_is_logged_only_when_asked(tmp_path):
    from classifier.serving.pyfunc import to_batch

    log = PredictionLog(tmp_path, max_bytes=10**6, backups=1, keep_images=True)
    batch = images(1)
    log.append(MODEL, batch, rows(1), 0.001)
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    logged = to_batch({"image": [record["image"]]}, (28, 28, 1), "stretch")
    np.testing.assert_array_equal(logged, batch)


def test_the_log_rotates_and_its_folder_stays_bounded(tmp_path):
    max_bytes, backups = 4000, 3
    log = PredictionLog(tmp_path, max_bytes=max_bytes, backups=backups)
    for request in range(200):
        log.append(MODEL, images(2, seed=request), rows(2, start=2 * request), 0.001)
    log.close()
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == [LOG_FILE, *(f"{LOG_FILE}.{n}" for n in range(1, backups + 1))]
    one_request = max(len(line) + 1 for line in (tmp_path / LOG_FILE).read_text().splitlines()) * 2
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) <= (backups + 1) * (
        max_bytes + one_request
    )
    # The window reads across the rotated files, newest last, in order.
    window = read_window(tmp_path, 25)
    assert [r["ood_score"] for r in window] == [3.0 + i for i in range(375, 400)]


def test_the_window_keeps_one_model_version_and_a_start_time(tmp_path):
    import datetime

    log = PredictionLog(tmp_path, max_bytes=10**6, backups=1)
    log.append(MODEL, images(2), rows(2), 0.001)
    log.append({"model": "digits-cnn", "version": 4}, images(3), rows(3), 0.001)
    log.close()
    assert len(read_window(tmp_path, 10, model="digits-cnn", version=3)) == 2
    assert len(read_window(tmp_path, 10, version=4)) == 3
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    assert read_window(tmp_path, 10, since=later) == []


def test_a_log_file_that_is_a_link_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("")
    (tmp_path / "log").mkdir()
    os.symlink(outside, tmp_path / "log" / LOG_FILE)
    with pytest.raises(LogFolderError, match="symbolic link"):
        PredictionLog(tmp_path / "log", max_bytes=1000, backups=1)
    assert outside.read_text() == ""


def test_a_line_that_is_not_utf8_is_skipped_and_counted(tmp_path, caplog):
    log = PredictionLog(tmp_path, max_bytes=10**6, backups=1)
    log.append(MODEL, images(2), rows(2), 0.001)
    log.close()
    with (tmp_path / LOG_FILE).open("ab") as damaged:
        damaged.write(b'{"time": "2026-12-01T00:00:00+00:00", "model": "\xff"}\n')
        damaged.write(b"not json at all\n")
    log = PredictionLog(tmp_path, max_bytes=10**6, backups=1)
    log.append(MODEL, images(1), rows(1, start=2), 0.001)
    log.close()
    with caplog.at_level("WARNING"):
        window = read_window(tmp_path, 10)
    assert [r["ood_score"] for r in window] == [3.0, 4.0, 5.0]
    assert "skipped 2 unreadable lines" in caplog.text


def test_one_large_request_cannot_pass_the_logs_bound(tmp_path):
    max_bytes, backups = 2048, 1
    log = PredictionLog(tmp_path, max_bytes=max_bytes, backups=backups)
    log.append(MODEL, images(3000), rows(3000), 0.001)  # ~700 KB of lines in one request
    log.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOG_FILE, f"{LOG_FILE}.1"]
    assert all(path.stat().st_size <= max_bytes for path in tmp_path.iterdir())
    # What is kept is the newest lines, whole and in order.
    window = read_window(tmp_path, 10_000)
    assert [r["ood_score"] for r in window] == [3.0 + i for i in range(3000 - len(window), 3000)]
