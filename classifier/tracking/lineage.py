"""Tags that tie a run to its code and data: git commit, DVC experiment, DVC hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import yaml

from classifier.errors import StageError

log = logging.getLogger(__name__)

# MLflow's own tag makes the UI link the run to its commit.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DVC_EXP_NAME = "dvc.exp_name"
TAG_DVC_BASELINE = "dvc.exp_baseline_rev"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def lineage_tags() -> dict[str, str]:
    """Tags tying a run to its code (git) and its DVC experiment, where there is one."""
    tags: dict[str, str] = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags[TAG_GIT_DIRTY] = str(bool(status)).lower()
    # DVC sets these while running `dvc exp run`.
    for variable, tag in (
        ("DVC_EXP_NAME", TAG_DVC_EXP_NAME),
        ("DVC_EXP_BASELINE_REV", TAG_DVC_BASELINE),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def dvc_lock_tags(lock_path: Path, stage: str, model_path: Path) -> dict[str, str]:
    """Tags naming the hashes ``dvc.lock`` records for ``stage``'s deps and outs.

    Only when the lock describes the model at ``model_path`` (its md5 matches), which holds
    while ``dvc repro`` or ``dvc exp run`` runs the pipeline: DVC writes each stage's entry
    as soon as the stage ends. A stage run by hand gets none, rather than stale ones.
    """
    try:
        entry = yaml.safe_load(Path(lock_path).read_text())["stages"][stage]
        files = [("dep", item) for item in entry.get("deps", [])]
        files += [("out", item) for item in entry.get("outs", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    hashes = {
        f"dvc.{stage}.{kind}.{item['path']}": item["md5"]
        for kind, item in files
        if isinstance(item, dict) and "md5" in item
    }
    model_key = f"dvc.{stage}.out.{Path(model_path).as_posix()}"
    try:
        model_md5 = hashlib.md5(Path(model_path).read_bytes()).hexdigest()
    except OSError:
        return {}
    if hashes.get(model_key) != model_md5:
        log.info("%s does not describe %s: no data hashes tagged", lock_path, model_path)
        return {}
    return hashes


def read_run_id(run_info_path: Path) -> str:
    """The MLflow run id that the train stage recorded in ``run_info_path``."""
    try:
        run_id = json.loads(Path(run_info_path).read_text())["run_id"]
    except FileNotFoundError:
        raise StageError(f"{run_info_path}: missing; run the train stage first") from None
    except (ValueError, KeyError, TypeError):
        raise StageError(f"{run_info_path}: expected JSON with a run_id") from None
    if not isinstance(run_id, str) or not run_id:
        raise StageError(f"{run_info_path}: run_id must be a non-empty string")
    return run_id
