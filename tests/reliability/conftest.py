"""Helpers for the fault tests: run a stage as a user would, and check what it left behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, TEST_EXPERIMENT
from tests.conftest import train_args as shared_train_args

# Keep stderr to what the stage itself says: no INFO logs, no TensorFlow start-up chatter.
QUIET = {"LOG_LEVEL": "ERROR", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
# What a stage leaves beside an output while writing it (stages/atomic.py and friends).
TEMPORARY_MARKERS = (".tmp-", ".old-", ".work-", ".downloads", ".archive-")


def stage_env(store: str | None = None, **extra: str) -> dict[str, str]:
    """This environment without MLflow/DVC settings, quiet, logging to ``store`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(QUIET)
    if store is not None:
        env.update(MLFLOW_TRACKING_URI=store, MLFLOW_EXPERIMENT_NAME=TEST_EXPERIMENT)
    env.update(extra)
    return env


def run_cli(
    stage: str,
    *args: object,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    **popen: Any,
) -> subprocess.CompletedProcess[str]:
    """``python -m stages.<stage> ARGS`` from the project root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=stage_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def one_line_error(stderr: str, stage: str, *, only: bool = True) -> str:
    """The message of the single ``<stage>: error:`` line that ends ``stderr``.

    With ``only``, that line must be all of stderr; else other lines may come before it
    (a library's warnings), but never a traceback.
    """
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    prefix = f"{stage}: error: "
    assert lines and lines[-1].startswith(prefix), stderr
    assert sum(line.startswith(prefix) for line in lines) == 1, stderr
    if only:
        assert len(lines) == 1, stderr
    return lines[-1].removeprefix(prefix)


def failed_in_one_line(done: subprocess.CompletedProcess[str], stage: str, **options: Any) -> str:
    """Check the stage exited 1 with one error line; return its message."""
    assert done.returncode == 1, done.stderr
    return one_line_error(done.stderr, stage, **options)


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    """The project's params.yaml with some keys of some sections replaced, written to ``path``."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, relative POSIX path -> content."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporaries a stage left under ``folder`` (hidden names with a temporary marker)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in Path(folder).rglob(".*")
        if any(marker in p.name for marker in TEMPORARY_MARKERS)
    )


def train_args(data: Path, out: Path, params: Path) -> list[str]:
    """The train stage's command-line arguments, every output under ``out``."""
    return shared_train_args(data, out, params, models=out / "models")


# Root ignores file permissions through two capabilities; drop them to test read-only folders.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_root_file_override() -> None:
    """``preexec_fn``: the child (and what it execs) obeys file permissions even as root."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@contextlib.contextmanager
def obeying_file_permissions() -> Iterator[None]:
    """Within the block, this thread obeys file permissions even as root.

    Capabilities belong to a thread: dropping CAP_DAC_OVERRIDE from this thread's effective
    set (it stays permitted, so it can come back) leaves the rest of the process alone.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    saved = data[0].effective
    data[0].effective = saved & ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made read-only (0o555) for the block, then writable again."""
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def require_read_only(folder: Path, *, in_child: bool) -> None:
    """Skip unless writing into ``folder`` is refused here (the way the test will write)."""
    probe = folder / "probe"
    if in_child:
        done = subprocess.run(
            [sys.executable, "-c", f"open({str(probe)!r}, 'w')"],
            preexec_fn=drop_root_file_override,
            capture_output=True,
        )
        refused = done.returncode != 0
    else:
        with obeying_file_permissions():
            try:
                probe.write_text("x")
                refused = False
            except PermissionError:
                refused = True
    if not refused:
        probe.unlink(missing_ok=True)
        pytest.skip(f"cannot make {folder} read-only here")
