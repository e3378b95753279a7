"""The DVC side of a sweep: each trial is a queued DVC experiment, run by DVC's workers.

Queueing, starting workers and killing use DVC's own commands, as a person would type them
(``dvc exp run --queue -n NAME -S ...``, ``dvc queue start -j N``, ``dvc queue kill``), so
every trial is an experiment like any other: it shows in ``dvc exp show`` and ``dvc exp
apply`` applies it. The frequent reads go through DVC's Python API, which answers in a
tenth of a second where a ``dvc`` process takes a second or more of CPU from the trials:
which trials are done (the queue's status), and a finished trial's metric (its metrics
file at its commit).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from classifier.cli import RUN_INFO
from classifier.errors import StageError

log = logging.getLogger(__name__)

# DVC's names for a queued experiment's state (dvc queue status).
QUEUED, RUNNING, SUCCESS, FAILED = "Queued", "Running", "Success", "Failed"
DONE = (SUCCESS, FAILED)
DVC_TIMEOUT_S = 600


class QueueError(StageError):
    """A DVC command of the sweep failed."""


def dvc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with this Python's folder first on PATH: DVC starts its workers
    and the stages' ``python`` from PATH, and they must be this project's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "true"
    env.update(extra or {})
    return env


def dvc(
    root: Path,
    *args: str,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = DVC_TIMEOUT_S,
) -> str:
    """Run ``dvc ARGS`` in ``root``; its output, or a QueueError with DVC's own message (or
    saying it did not answer within ``timeout`` seconds, after which it is killed)."""
    command = [sys.executable, "-m", "dvc", *args]
    # Files, not pipes: `dvc queue start` leaves workers running that inherit its output,
    # and a pipe would not close (nor this call return) until they exit.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        try:
            done = subprocess.run(
                command,
                cwd=root,
                env=dvc_env(extra_env),
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise QueueError(
                f"dvc {' '.join(args[:3])}: no answer within {timeout:g} s; stopped"
            ) from None
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if done.returncode != 0:
        message = next(
            (line for line in errors.splitlines() if line.startswith("ERROR")),
            (errors.strip().splitlines() or [f"exit code {done.returncode}"])[-1],
        )
        raise QueueError(f"dvc {' '.join(args[:3])}: {message.removeprefix('ERROR: ')}")
    return output


def dvc_value(value: Any) -> str:
    """``value`` as a ``-S key=value`` override that DVC writes back with the same type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dvc_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def queue_trial(root: Path, name: str, overrides: Mapping[str, Any], target: str) -> None:
    """Queue DVC experiment ``name``: the pipeline up to stage ``target``, with ``overrides``
    set."""
    settings = [f"{key}={dvc_value(value)}" for key, value in overrides.items()]
    settings = [arg for setting in settings for arg in ("-S", setting)]
    try:
        dvc(root, "exp", "run", "--queue", target, "-n", name, *settings)
    except QueueError as error:
        if "conflicts with existing experiment" not in str(error):
            raise
        raise QueueError(
            f"DVC experiment {name} exists already, from an earlier sweep of this name: "
            f"give the sweep another name (name: in the spec), or remove those experiments "
            f"(dvc exp remove {name} ...)"
        ) from None


def start_workers(root: Path, workers: int, env: Mapping[str, str] | None = None) -> None:
    """Make sure ``workers`` DVC queue workers run (``dvc queue start -j N``).

    DVC's workers stop after ten idle seconds; starting them again is cheap and starts
    only the missing ones.
    """
    dvc(root, "queue", "start", "-j", str(workers), extra_env=env)


def statuses(root: Path) -> dict[str, str]:
    """Every queued experiment's name -> Queued, Running, Success or Failed."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        entries = repo.experiments.celery_queue.status()
    found: dict[str, str] = {}
    for entry in sorted(entries, key=lambda entry: entry["timestamp"]):
        if entry.get("name"):
            found[entry["name"]] = entry["status"]
    return found


def without_process(root: Path, names: Iterable[str]) -> set[str]:
    """Those of ``names``, experiments DVC calls Running, that have no live process.

    A worker takes a trial from the queue before it starts the trial's process. DVC's idle
    workers stop on their own, and one that stops just as a trial arrives takes it and never
    runs it (seen in a search: "monitor: shutting down due to empty queue", then the trial
    Running for ever with no worker left). A worker killed mid-trial leaves the same. Such a
    trial has no process, or only one that has ended; a trial being set up or collected has
    none for a few seconds too, so callers wait before they conclude.
    """
    from dvc.repo import Repo

    wanted = set(names)
    found: set[str] = set()
    with Repo(str(root)) as repo:
        celery = repo.experiments.celery_queue
        for entry in celery.iter_active():
            if entry.name in wanted:
                process = celery.proc.get(entry.stash_rev)
                if process is None or process.returncode is not None or not _alive(process.pid):
                    found.add(entry.name)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number
        return False
    return True


def experiment_names(root: Path) -> set[str]:
    """The names of the experiments DVC holds (finished ones, whatever their baseline)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        listed = repo.experiments.ls(all_commits=True)
    return {name for entries in listed.values() for name, _ in entries if name}


def metric(root: Path, name: str, file: str, key: str) -> float | None:
    """The value of ``key`` (dotted for nested keys) in metrics file ``file`` of finished
    experiment ``name``, read at its commit; None if there is no finite number there.

    ``dvc.api.read`` of one file at the experiment's commit costs a tenth of a second of
    CPU, where ``dvc exp show`` reads every experiment (5 s of CPU with a dozen, and more
    with each) and fails while DVC shows a lost trial Running (see ``without_process``).
    """
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        text = dvc.api.read(file, repo=str(root), rev=name)
        # JSON as JSON: YAML 1.1 reads 1e-05 as a string.
        value: Any = json.loads(text) if file.endswith(".json") else yaml.safe_load(text)
    except (DvcException, OSError, ValueError, yaml.YAMLError) as error:
        log.info("%s: no %s: %s", name, file, error)
        return None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def train_run_id(root: Path, name: str) -> str | None:
    """The MLflow run experiment ``name``'s model came from (its lineage/train_run.json)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return json.loads(dvc.api.read(RUN_INFO[0], repo=str(root), rev=name))["run_id"]
    except (DvcException, OSError, ValueError, KeyError, TypeError) as error:
        log.info("%s: no training run recorded: %s", name, error)
        return None


def head(root: Path) -> str:
    """The commit trials queued now start from."""
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise QueueError(f"{root}: not a git repository with a commit; DVC experiments need one")
    return done.stdout.strip()


def stop(root: Path, running: Iterable[str], queued: Iterable[str]) -> bool:
    """Interrupt ``running`` experiments (their stages see Ctrl-C) and drop ``queued`` ones.

    An experiment DVC calls Running with no process ends Failed. False if DVC refused to
    stop any of ``running`` (one finished meanwhile, or a worker does run it).
    """
    stopped = True
    for name in running:
        try:
            dvc(root, "queue", "kill", name)
        except QueueError as error:
            log.info("%s", error)
            stopped = False
    queued = list(queued)
    if queued:
        try:
            dvc(root, "queue", "remove", *queued)
        except QueueError as error:
            log.info("%s", error)
    return stopped


def failure(root: Path, name: str) -> str:
    """The line that says why experiment ``name`` failed, from its log."""
    try:
        output = dvc(root, "queue", "logs", name)
    except QueueError as error:
        return str(error)
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:  # a stage's own one-line error says it best
        if ": error: " in line:
            return line
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["failed; see dvc queue logs " + name])[0]
