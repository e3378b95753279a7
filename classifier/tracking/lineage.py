"""Tags that tie a run to its code and data: git commit, DVC experiment, DVC hashes.

Of what ``dvc.lock`` records, a run gets a few tags a person would search by: one code
version per stage (``code.train``: a hash over the md5s of the stage's code deps) and the
data's md5 (``data``); every file's md5 goes into the run artifact ``lineage/dvc_lock.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from classifier.errors import StageError

log = logging.getLogger(__name__)

# MLflow's own tag makes the UI link the run to its commit.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DVC_EXP_NAME = "dvc.exp_name"
TAG_DVC_BASELINE = "dvc.exp_baseline_rev"
TAG_CODE = "code.{stage}"
TAG_DATA = "data"
# Where the per-file md5s behind those tags go, as a run artifact.
LOCK_ARTIFACT_DIR = "lineage"
LOCK_ARTIFACT = "dvc_lock.json"
CODE_FOLDERS = ("classifier", "stages", "tools")
DATA = "data/"
CODE_VERSION_CHARS = 12


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


@dataclass(frozen=True)
class LockEntry:
    """What ``dvc.lock`` records of one stage: the md5 of each dep and out, by path."""

    stage: str
    deps: dict[str, str]
    outs: dict[str, str]

    def code_version(self) -> str:
        """A short hash over the md5s of the stage's code deps: the same code, the same tag."""
        code = sorted((path, md5) for path, md5 in self.deps.items() if _is_code(path))
        listing = "".join(f"{path} {md5}\n" for path, md5 in code)
        return hashlib.sha256(listing.encode()).hexdigest()[:CODE_VERSION_CHARS]

    def data_version(self) -> str | None:
        """The md5 of the stage's data dep (``data/prepared``), as dvc.lock writes it."""
        data = sorted((path, md5) for path, md5 in self.deps.items() if path.startswith(DATA))
        if len(data) == 1:
            return data[0][1]
        if not data:
            return None
        listing = "".join(f"{path} {md5}\n" for path, md5 in data)
        return hashlib.md5(listing.encode()).hexdigest()  # several data deps: one hash of all

    def tags(self) -> dict[str, str]:
        """``code.<stage>``, and ``data`` where the stage reads data."""
        tags = {TAG_CODE.format(stage=self.stage): self.code_version()}
        data = self.data_version()
        if data is not None:
            tags[TAG_DATA] = data
        return tags

    def hashes(self) -> dict[str, str]:
        """Every md5, flat: ``dvc.<stage>.dep.<path>`` and ``dvc.<stage>.out.<path>``."""
        return {
            **{f"dvc.{self.stage}.dep.{path}": md5 for path, md5 in self.deps.items()},
            **{f"dvc.{self.stage}.out.{path}": md5 for path, md5 in self.outs.items()},
        }


def _is_code(path: str) -> bool:
    return path.split("/")[0] in CODE_FOLDERS


def lock_entry(lock_path: Path, stage: str, model_path: Path) -> LockEntry | None:
    """``dvc.lock``'s entry for ``stage``, if it describes the model at ``model_path``.

    It does when it records the model (a dep or an out) with the model's md5, which holds
    while ``dvc repro`` or ``dvc exp run`` runs the pipeline: DVC writes each stage's entry
    as soon as the stage ends. A stage run by hand gets None, rather than stale hashes.
    """
    try:
        entry = yaml.safe_load(Path(lock_path).read_text())["stages"][stage]
        deps, outs = (
            {item["path"]: item["md5"] for item in entry.get(kind) or [] if "md5" in item}
            for kind in ("deps", "outs")
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    model = Path(model_path).as_posix()
    try:
        model_md5 = hashlib.md5(Path(model_path).read_bytes()).hexdigest()
    except OSError:
        return None
    if model_md5 not in (deps.get(model), outs.get(model)):
        log.info("%s does not describe %s: no DVC hashes recorded", lock_path, model_path)
        return None
    return LockEntry(stage, deps, outs)


def lock_entries(lock_path: Path, stages: Sequence[str], model_path: Path) -> list[LockEntry]:
    """The entries of ``stages`` that describe the model at ``model_path`` (see ``lock_entry``)."""
    found = (lock_entry(lock_path, stage, model_path) for stage in stages)
    return [entry for entry in found if entry is not None]


def lock_tags(entries: Sequence[LockEntry]) -> dict[str, str]:
    """The few tags a person searches by: ``code.<stage>`` for each stage, and ``data``."""
    return {key: value for entry in entries for key, value in entry.tags().items()}


def lock_record(lock_path: Path, entries: Sequence[LockEntry]) -> dict:
    """The per-file detail behind the tags, for the run artifact ``LOCK_ARTIFACT``."""
    return {
        "lock": Path(lock_path).as_posix(),
        "tags": lock_tags(entries),
        "stages": {entry.stage: {"deps": entry.deps, "outs": entry.outs} for entry in entries},
    }


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
