"""The one process harness: start a group, wait until healthy, stop every member."""

from __future__ import annotations

import signal
import sys

import pytest

from classifier.processes import ProcessError, ProcessGroup, alive, descendants, ignores
from tests.helpers import free_port

SLEEPER = "import time; time.sleep(300)"
# Starts two children: one in the same process group, one that moves to a group of its own
# (still in the session), then waits.
FAMILY = """
import os, subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
subprocess.Popen(sleeper)
subprocess.Popen(sleeper, process_group=0)
print("ready", flush=True)
time.sleep(300)
"""
# Takes Ctrl-C as Python does by default, even where it started with SIGINT ignored (a suite
# run as a background job).
LISTENER = """
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)
print("ready", flush=True)
time.sleep(300)
"""
DEAF = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""


def started(group: ProcessGroup) -> None:
    """Wait until the group's script printed its ready line into its log."""
    group.wait_until(lambda: "ready" in group.log_tail(), timeout=60)


def test_stop_ends_every_member_even_one_in_another_group_of_the_session(tmp_path):
    group = ProcessGroup.start(
        "family", [sys.executable, "-c", FAMILY], log_path=tmp_path / "family.log"
    )
    started(group)
    family = [group.pid, *descendants(group.pid)]
    assert len(family) == 3
    assert set(family) <= set(group.members())
    group.stop(grace=5)
    assert not [pid for pid in family if alive(pid)]
    assert not [pid for pid in group.members() if alive(pid)]  # zombies hold nothing


def test_a_member_deaf_to_sigint_and_sigterm_is_killed_after_the_grace_periods(tmp_path):
    group = ProcessGroup.start("deaf", [sys.executable, "-c", DEAF], log_path=tmp_path / "d.log")
    started(group)
    assert group.stop(grace=0.5) == -9  # SIGKILL
    assert not alive(group.pid)


def test_a_member_that_ignores_sigint_is_seen_to_and_stopped_with_sigterm(tmp_path):
    script = DEAF.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN)", "")
    group = ProcessGroup.start("half-deaf", [sys.executable, "-c", script], log_path=tmp_path / "l")
    started(group)
    assert ignores(group.pid, signal.SIGINT)
    assert not ignores(group.pid, signal.SIGTERM)
    assert group.stop(grace=10) == -signal.SIGTERM


def test_stop_returns_the_exit_code_of_a_leader_that_stops_on_sigint(tmp_path):
    group = ProcessGroup.start(
        "listener", [sys.executable, "-c", LISTENER], log_path=tmp_path / "listener.log"
    )
    started(group)
    assert group.stop(grace=10) in (1, -signal.SIGINT)  # KeyboardInterrupt: exit 1, or by SIGINT


def test_waiting_for_health_fails_at_once_with_the_log_when_the_process_exits(tmp_path):
    script = "print('cannot start: no database'); raise SystemExit(3)"
    group = ProcessGroup.start("server", [sys.executable, "-c", script], log_path=tmp_path / "l")
    with pytest.raises(ProcessError, match=r"server exited with code 3.*\n.*no database"):
        group.wait_for_http(f"http://127.0.0.1:{free_port()}/health", timeout=60)


def test_waiting_for_health_fails_at_the_deadline_naming_it(tmp_path):
    group = ProcessGroup.start("silent", [sys.executable, "-c", SLEEPER])
    try:
        with pytest.raises(ProcessError, match=r"silent was not healthy within 1 s"):
            group.wait_for_http(f"http://127.0.0.1:{free_port()}/health", timeout=1)
    finally:
        group.stop(grace=2)


def test_waiting_for_health_returns_once_the_server_answers(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with ProcessGroup.start("http.server", command, cwd=tmp_path) as group:
        group.wait_for_http(f"http://127.0.0.1:{port}/", timeout=60)
        assert alive(group.pid)
    assert not alive(group.pid)
