"""One pipeline run at a time in a DVC workspace: a guard every stage takes while it runs.

DVC runs one experiment at a time in a workspace (``dvc exp run --queue`` runs several,
each in a copy of its own), but it does not stop a second ``dvc exp run`` there: the second
writes its ``-S`` values into params.yaml while the first is still running, the first goes
on with them, and DVC then fails both. Under DVC (which sets ``DVC_ROOT`` for every stage)
each stage therefore:

- takes an exclusive lock for the workspace, so a stage of another run that starts while
  one runs stops at once, naming the running one and pointing to ``--queue``;
- records params.yaml's content hash for its pipeline run (the ``dvc`` process that runs
  it), so a later stage of the same run stops when params.yaml changed under it, rather
  than mixing two sets of params in one result;
- checks that params.yaml still holds every ``-S key=value`` its ``dvc exp run`` was
  started with. A second ``dvc exp run`` writes its own values before DVC's lock stops it,
  possibly while the first run's early stages are skipped as unchanged: the first stage
  that runs then already sees the other run's values, and the hash alone cannot tell.

Outside DVC (a stage run by hand, the tests) nothing is checked. Linux and macOS only (fcntl).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from classifier.errors import StageError

LOCK_FILE = Path(".dvc") / "tmp" / "classifier-stage.lock"
STATE_FILE = Path(".dvc") / "tmp" / "classifier-stage.json"
SHELLS = frozenset({"sh", "bash", "dash", "zsh"})
QUEUE_HINT = (
    "run experiments one at a time, or queue them: dvc exp run --queue ...; dvc queue start"
)


class ConcurrentRun(StageError):
    """Another pipeline run is using this workspace, or changed params.yaml under this one."""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def pipeline_pid() -> int:
    """The process running this stage's pipeline: the first ancestor that is not a shell."""
    pid = os.getppid()
    while _comm(pid) in SHELLS:
        pid = _parent(pid)
    return pid


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


SET_PARAM_FLAGS = ("-S", "--set-param")


def set_params_of(pid: int) -> dict[str, str]:
    """The ``-S key=value`` overrides of process ``pid`` if it is a ``dvc exp run``, by key.

    Only plain ``key=value`` overrides (and ``file:key=value`` for params.yaml): Hydra's
    ``+key``, ``~key`` and sweeps are left to DVC.
    """
    argv = _command_line(pid)
    starts = [i for i in range(len(argv) - 1) if argv[i : i + 2] == ["exp", "run"]]
    if not starts:
        return {}
    found, args = {}, iter(argv[starts[0] + 2 :])
    for arg in args:
        value = None
        for flag in SET_PARAM_FLAGS:
            if arg == flag:
                value = next(args, "")
            elif arg.startswith(f"{flag}="):
                value = arg[len(flag) + 1 :]
            elif flag == "-S" and arg.startswith(flag) and len(arg) > len(flag):
                value = arg[len(flag) :]
        if value is None or "=" not in value or value[:1] in "+~":
            continue
        key, assigned = value.split("=", 1)
        key = key.split(":", 1)[1] if key.startswith("params.yaml:") else key
        if ":" not in key and "," not in assigned:
            found[key] = assigned
    return found


def _changed_overrides(params_path: Path, overrides: dict[str, str]) -> list[str]:
    """The ``-S`` overrides that ``params_path`` no longer holds, as ``key is X, not Y``."""
    import yaml

    try:
        params = yaml.safe_load(Path(params_path).read_text())
    except (OSError, ValueError):
        return []  # loading the params reports a broken file, in its own words
    changed = []
    for key, assigned in overrides.items():
        value: object = params
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        try:
            expected = yaml.safe_load(assigned)
        except ValueError:
            expected = assigned
        if value != expected and str(value) != assigned:
            changed.append(f"{key} is {value!r}, not {expected!r}")
    return changed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    experiment = f" of experiment {holder['experiment']!r}" if holder.get("experiment") else ""
    return f"stage {holder.get('stage')}{experiment} (pid {holder.get('pid')})"


# `dvc exp run --queue` and `--temp` run each experiment in its own copy under here.
TEMP_COPIES = Path(".dvc") / "tmp" / "exps"


def workspace_root() -> Path | None:
    """The workspace this stage runs in under DVC; None outside DVC.

    For a queued or ``--temp`` experiment DVC sets ``DVC_ROOT`` to the project it copied,
    not to the copy the stage runs in: there the copy is the workspace, so that queue
    workers running side by side (``dvc queue start -j 2``) do not stop each other.
    """
    root = os.environ.get("DVC_ROOT")
    if not root:
        return None
    here, copies = Path.cwd().resolve(), (Path(root) / TEMP_COPIES).resolve()
    if here.is_relative_to(copies) and here != copies:
        return copies / here.relative_to(copies).parts[0]
    return Path(root)


@contextlib.contextmanager
def exclusive_stage(stage: str, params_path: Path) -> Iterator[None]:
    """Hold the workspace for stage ``stage`` while the block runs (only under DVC)."""
    root = workspace_root()
    if root is None:
        yield
        return
    import fcntl

    lock_path, state_path = root / LOCK_FILE, root / STATE_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(state_path).get("running", {})
            raise ConcurrentRun(
                f"another pipeline run is using this workspace: {_describe(holder)} is "
                f"running; {QUEUE_HINT}"
            ) from None
        try:
            _claim(state_path, stage, params_path)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(state_path: Path) -> dict:
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _claim(state_path: Path, stage: str, params_path: Path) -> None:
    """Record this stage's pipeline run; stop if another live run holds the workspace, or if
    params.yaml changed since an earlier stage of this one."""
    try:
        digest = hashlib.sha256(Path(params_path).read_bytes()).hexdigest()
    except OSError:
        digest = ""  # loading the params reports a missing file, in its own words
    mine, state = pipeline_pid(), _read(state_path)
    runs = {
        int(pid): run
        for pid, run in (state.get("runs") or {}).items()
        if str(pid).isdigit() and _alive(int(pid))
    }
    others = [run for pid, run in runs.items() if pid != mine]
    if others:
        raise ConcurrentRun(
            f"another pipeline run is using this workspace: {_describe(others[0])} ran last; "
            f"{QUEUE_HINT}"
        )
    changed = _changed_overrides(params_path, set_params_of(mine))
    if changed:
        raise ConcurrentRun(
            f"{params_path} changed since this `dvc exp run` started: {'; '.join(changed)}. "
            f"Another `dvc exp run` in this workspace wrote its params; nothing was trained "
            f"with them. {QUEUE_HINT}"
        )
    if mine in runs and runs[mine].get("params_sha256") != digest:
        raise ConcurrentRun(
            f"{params_path} changed while this pipeline ran (after stage "
            f"{runs[mine].get('stage')}); another `dvc exp run` in this workspace? Its "
            f"results would mix two sets of params; {QUEUE_HINT}"
        )
    run = {
        "params_sha256": digest,
        "stage": stage,
        "pid": os.getpid(),
        "experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    _write(state_path, {"runs": {str(mine): run}, "running": run})


def _write(state_path: Path, state: dict) -> None:
    tmp = state_path.with_name(f".{state_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, state_path)
