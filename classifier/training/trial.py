"""A sweep's trial: its parent MLflow run and its share of the machine.

A sweep (``python -m tools.sweep``, classifier/sweeps/) runs each trial as a queued DVC
experiment, in a temporary copy of the project run by one of DVC's queue workers.
Environment variables set while queueing do not reach those workers reliably, so the
sweep writes one small JSON file per trial, named after its DVC experiment, under
``.dvc/tmp/sweep-trials/`` at the project root. The train stage finds it from the copy
(``DVC_EXP_NAME`` names the experiment; ``store.project_root()`` maps the copy back to
the project) and:

- opens its MLflow run as a child of the sweep's parent run;
- gives TensorFlow only its share of the cores (``threads``: the cores divided between the
  workers), so two trials on a 2-core machine do not each start two busy threads;
- on a machine with GPUs, takes one of ``devices`` that no other trial holds (a lock file
  per device, released when the process ends, even by SIGKILL), shows TensorFlow only that
  one (``CUDA_VISIBLE_DEVICES``) and turns memory growth on.

Without the file (``dvc repro``, a plain ``dvc exp run``, the tests) nothing here changes
anything. The model stays pure Keras: only the set-up below names TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from classifier.atomic import write_json
from classifier.tracking.store import project_root

log = logging.getLogger(__name__)

TRIALS_DIR = Path(".dvc") / "tmp" / "sweep-trials"
DEVICE_LOCKS = "devices"
GPU_ENV = "CUDA_VISIBLE_DEVICES"
GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"

# The lock on this trial's device, held until the process ends.
_held: list[IO[str]] = []


@dataclass(frozen=True)
class TrialSetup:
    """What a sweep tells one trial."""

    sweep: str
    parent_run_id: str
    threads: int
    devices: tuple[str, ...] = ()


def trial_file(root: Path, experiment: str) -> Path:
    return Path(root) / TRIALS_DIR / f"{experiment}.json"


def write_setup(root: Path, experiment: str, setup: TrialSetup) -> Path:
    """Tell the trial that will run as DVC experiment ``experiment`` how to set itself up."""
    path = trial_file(root, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**asdict(setup), "devices": list(setup.devices)})
    return path


def read_setup(root: Path | None = None, experiment: str | None = None) -> TrialSetup | None:
    """This trial's set-up, or None when this is no sweep's trial."""
    experiment = experiment or os.environ.get("DVC_EXP_NAME", "")
    if not experiment:
        return None
    path = trial_file(project_root() if root is None else root, experiment)
    try:
        raw = json.loads(path.read_text())
        return TrialSetup(
            sweep=str(raw["sweep"]),
            parent_run_id=str(raw["parent_run_id"]),
            threads=max(1, int(raw["threads"])),
            devices=tuple(str(device) for device in raw.get("devices") or ()),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None


def claim_device(devices: tuple[str, ...], lock_dir: Path) -> str | None:
    """The first of ``devices`` no other live process holds, now held by this one.

    Each device has a lock file; ``flock`` ties the lock to this process, so a trial that
    dies for any reason frees its device. None when every device is taken (more workers
    than GPUs): the trial then runs on the CPU rather than share a GPU's memory.
    """
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        handle = (lock_dir / f"gpu-{device}.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held.append(handle)
        return device
    return None


def _set_threads(threads: int) -> None:
    import tensorflow as tf

    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:  # TensorFlow already started: too late to change
        log.warning("could not limit TensorFlow to %d threads: %s", threads, error)


def _use_device(device: str | None) -> None:
    import tensorflow as tf

    os.environ[GPU_ENV] = "" if device is None else device  # "" hides every GPU
    os.environ[GROWTH_ENV] = "true"
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def join_sweep() -> TrialSetup | None:
    """Set this process up as the sweep's trial says; None (and no change) if it is none.

    Call it before TensorFlow runs anything: threads and devices are fixed at its start.
    """
    setup = read_setup()
    if setup is None:
        return None
    _set_threads(setup.threads)
    device: Any = None
    if setup.devices:
        device = claim_device(setup.devices, project_root() / TRIALS_DIR / DEVICE_LOCKS)
        _use_device(device)
    log.info(
        "trial of sweep %s: %d threads%s; parent run %s",
        setup.sweep,
        setup.threads,
        f", GPU {device}" if setup.devices else "",
        setup.parent_run_id,
    )
    return setup
