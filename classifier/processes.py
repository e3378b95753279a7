"""Start a server or worker as a process group, wait until it is healthy, stop all of it.

One harness for everything that starts processes: ``make team-up``, the benchmarks and the
tests. A command runs in a session of its own, so its children (uvicorn workers, say)
share its process group; stopping sends SIGINT, then SIGTERM, then SIGKILL to the whole
group, each after a grace period, and returns only when no member of the group or session
is left, reaped or not. Linux only: members are read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PROC = Path("/proc")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
POLL_SECONDS = 0.1
LOG_TAIL_CHARS = 3000
ZOMBIE = "Z"


class ProcessError(RuntimeError):
    """A process exited, or did not become healthy, before its deadline."""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name; None if the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces or parentheses itself.
    return text[text.rindex(")") + 2 :].split()


def _state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, Z...), or None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[0]


def group_members(leader: int) -> list[int]:
    """Processes whose process group or session is ``leader``'s, zombies included."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields[0] is the state; [2] the process group; [3] the session.
        if fields is not None and leader in (int(fields[2]), int(fields[3])):
            members.append(int(entry.name))
    return sorted(members)


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` in the process tree, whatever its group or session."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:  # fields[1] is the parent's pid
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return sorted(found)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    return _state(pid) not in (None, ZOMBIE)


def ignores(pid: int, sig: int) -> bool:
    """Whether ``pid`` ignores ``sig`` (its SigIgn mask): sending it would change nothing.

    A shell starts background jobs with SIGINT ignored, and Python keeps an inherited
    SIG_IGN, so a plain Python child of a suite run as `make test &` never sees SIGINT.
    """
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _signal_members(leader: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)
    # A member that moved to another group of the same session still gets it.
    for pid in group_members(leader):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class ProcessGroup:
    """A command running as the leader of its own session and process group."""

    name: str
    process: subprocess.Popen[Any]
    log_path: Path | None = None

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        stdout: int | IO[Any] | None = None,
        text: bool = False,
    ) -> ProcessGroup:
        """Start ``command``; its output goes to ``log_path`` (appended), or to ``stdout``."""
        log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else stdout,
                stderr=subprocess.STDOUT if (log is not None or stdout is not None) else None,
                start_new_session=True,
                text=text,
            )
        finally:
            if log is not None:
                log.close()
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        """The end of the log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def wait_until(self, healthy: Callable[[], bool], timeout: float) -> None:
        """Poll ``healthy()`` until it is true; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not healthy():
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                what = (
                    f"exited with code {self.process.returncode}"
                    if exited
                    else f"was not healthy within {timeout:.0f} s"
                )
                where = f"; {self.log_path} ends:\n{self.log_tail()}" if self.log_path else ""
                raise ProcessError(f"{self.name} {what}{where}")
            time.sleep(POLL_SECONDS * 5)

    def wait_for_http(self, url: str, timeout: float) -> None:
        """Wait until ``url`` answers HTTP 200."""
        self.wait_until(lambda: http_ok(url), timeout)

    def members(self) -> list[int]:
        """The processes of this group or session that still exist (zombies included)."""
        return group_members(self.pid)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGINT, SIGTERM, then SIGKILL the group, ``grace`` seconds apart; wait until it is gone.

        Returns the leader's exit code. Raises ProcessError if a member outlives SIGKILL
        by ``grace`` seconds (a process stuck in the kernel).
        """
        for sig in STOP_SIGNALS:
            if not self._alive():
                break
            living = [pid for pid in self.members() if alive(pid)]
            if living and all(ignores(pid, sig) for pid in living):
                continue  # waiting out the grace period would be in vain
            _signal_members(self.pid, sig)
            deadline = time.monotonic() + grace
            while self._alive() and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        if self._alive():
            raise ProcessError(f"{self.name}: processes {self.members()} outlived SIGKILL")
        return self.process.returncode

    def _alive(self) -> bool:
        """Whether the leader or any living member is left (zombies hold nothing open)."""
        if self.process.poll() is None:  # also reaps the leader once it has exited
            return True
        return any(alive(pid) for pid in self.members())

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(
    name: str,
    command: Sequence[str],
    *,
    health_url: str | None = None,
    timeout: float = 180,
    **options: Any,
) -> Iterator[ProcessGroup]:
    """Start ``command`` as a group, wait for ``health_url`` if given, stop it after the block."""
    group = ProcessGroup.start(name, command, **options)
    try:
        if health_url is not None:
            group.wait_for_http(health_url, timeout)
        yield group
    finally:
        group.stop()
