"""The sweep's DVC calls: a DVC command that does not answer is stopped, and a show retried."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from classifier.sweeps import queue


def test_a_dvc_command_that_does_not_answer_in_time_is_stopped_with_one_error(tmp_path):
    # A real `dvc` process: its interpreter alone takes longer than a millisecond to start.
    started = time.monotonic()
    with pytest.raises(queue.QueueError, match=r"^dvc version: no answer within 0\.001 s"):
        queue.dvc(tmp_path, "version", timeout=0.001)
    assert time.monotonic() - started < queue.SHOW_TIMEOUT_S


def test_show_asks_again_after_a_show_that_hung(tmp_path: Path, monkeypatch):
    """The hang seen in a full test run (pygit2 waiting forever on a removed temporary copy)
    ends as a timeout; the next `dvc exp show` answers."""
    rows = [
        {
            "rev": "abc",
            "experiments": [
                {
                    "revs": [
                        {
                            "name": "trial-1",
                            "data": {
                                "params": {"params.yaml": {"data": {"train": {"epochs": 1}}}},
                                "metrics": {"metrics/train.json": {"data": {"val_loss": 0.5}}},
                            },
                        }
                    ]
                }
            ],
        }
    ]
    calls = []

    def dvc(root, *args, extra_env=None, timeout=queue.DVC_TIMEOUT_S):
        calls.append((args, timeout))
        if len(calls) == 1:
            raise queue.QueueError(f"dvc exp show --json: no answer within {timeout:g} s")
        return json.dumps(rows)

    monkeypatch.setattr(queue, "dvc", dvc)
    monkeypatch.setattr(queue.time, "sleep", lambda seconds: None)
    found = queue.show(tmp_path, ["abc"])
    assert [timeout for _, timeout in calls] == [queue.SHOW_TIMEOUT_S] * 2
    assert calls[0][0] == ("exp", "show", "--json", "--rev", "abc")
    assert found["trial-1"].metric("metrics/train.json", "val_loss") == 0.5
    assert found["trial-1"].params == {"train": {"epochs": 1}}
