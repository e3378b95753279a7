"""How a sweep shares the machine between its parallel trials: CPU threads and GPUs.

Each DVC queue worker runs one trial at a time, and TensorFlow would give every trial a
thread per core: two trials on two cores then run four busy threads and both slow down.
So each trial gets ``cores // workers`` threads (at least one).

On a machine with GPUs each running trial holds one GPU of its own, with memory growth
on (TensorFlow otherwise reserves all of a GPU's memory). Trials do not know which worker
runs them, so the sweep hands every trial the list of GPUs and each takes the first one
no other live trial holds (classifier/training/trial.py, a lock file per GPU). With more
workers than GPUs the extra trials run on the CPU rather than share a GPU's memory.
The GPUs are those ``CUDA_VISIBLE_DEVICES`` names, else those ``nvidia-smi`` lists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from classifier.training.trial import GPU_ENV, GROWTH_ENV


@dataclass(frozen=True)
class Share:
    """What each trial of a sweep may use."""

    threads: int
    devices: tuple[str, ...]

    def worker_env(self) -> dict[str, str]:
        """Environment for the queue workers (and so every stage they run)."""
        return {GROWTH_ENV: "true"} if self.devices else {}


def cpu_count() -> int:
    """The cores this process may run on (a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def visible_gpus(
    environ: Mapping[str, str] | None = None, nvidia_smi: str | None = None
) -> tuple[str, ...]:
    """The GPUs trials may use: ``CUDA_VISIBLE_DEVICES`` when set, else nvidia-smi's list.

    ``nvidia_smi`` is that command's output (``--query-gpu=index --format=csv,noheader``),
    read from the machine when not given.
    """
    environ = os.environ if environ is None else environ
    if GPU_ENV in environ:
        listed = [part.strip() for part in environ[GPU_ENV].split(",")]
        # "" or "-1" hide every GPU; CUDA ignores the list from the first invalid entry on.
        devices = []
        for device in listed:
            if not device or device.startswith("-"):
                break
            devices.append(device)
        return tuple(devices)
    if nvidia_smi is None:
        nvidia_smi = _nvidia_smi()
    return tuple(line.strip() for line in nvidia_smi.splitlines() if line.strip().isdigit())


def _nvidia_smi() -> str:
    command = shutil.which("nvidia-smi")
    if command is None:
        return ""
    try:
        done = subprocess.run(
            [command, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def plan_share(workers: int, cores: int, gpus: tuple[str, ...]) -> Share:
    """Divide ``cores`` between ``workers`` trials; every trial may take one of ``gpus``."""
    return Share(threads=max(1, cores // max(1, workers)), devices=tuple(gpus))
