"""Which git revision holds the champion's results, for ``dvc plots diff`` and friends.

The champion's MLflow run names the DVC experiment it ran in and the commit it started
from; neither alone is the revision whose ``dvc.lock`` records its outputs: a ``dvc repro``
in the workspace is recorded by the commit of ``dvc.lock`` that follows it, and an
experiment may have been removed since. So each candidate (the run's experiment first,
then the other experiments, then the commits that changed ``dvc.lock``) is checked: its
``dvc.lock`` must record a ``lineage/train_run.json`` that names the champion's run.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from classifier.cli import RUN_INFO
from classifier.errors import StageError
from classifier.tracking import registry, runs
from classifier.tracking.lineage import TAG_DVC_EXP_NAME

log = logging.getLogger(__name__)

CHAMPION = "champion"
EXPERIMENT_REFS = "refs/exps/"
COMMITS_SEARCHED = 200  # the newest commits that changed dvc.lock


def _git(repo: Path, *args: str) -> str | None:
    """Git's output in ``repo``; None where git fails (no repository, no such object)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def experiment_refs(repo: Path) -> dict[str, str]:
    """DVC's experiments in ``repo``: commit by experiment name, newest first."""
    listing = _git(
        repo,
        "for-each-ref",
        "--sort=-committerdate",
        "--format=%(objectname) %(refname)",
        EXPERIMENT_REFS,
    )
    found: dict[str, str] = {}
    for line in (listing or "").splitlines():
        commit, ref = line.split(" ", 1)
        # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; refs/exps/exec/... and
        # refs/exps/celery/... are DVC's own bookkeeping, not experiments.
        parts = ref.removeprefix(EXPERIMENT_REFS).split("/")
        if len(parts) == 3 and len(parts[0]) == 2:
            found.setdefault(parts[2], commit)
    return found


def _recorded_run_id(repo: Path, commit: str, cache_path: Callable[[str], str]) -> str | None:
    """The run id of the lineage/train_run.json that ``commit``'s dvc.lock records."""
    lock_text = _git(repo, "show", f"{commit}:dvc.lock")
    if lock_text is None:
        return None
    try:
        outs = yaml.safe_load(lock_text)["stages"]["train"]["outs"]
        md5 = next(out["md5"] for out in outs if out["path"] == RUN_INFO[0])
        return json.loads(Path(cache_path(md5)).read_text())["run_id"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration, OSError, ValueError):
        return None


def champion_rev(model_name: str, repo: Path = Path(".")) -> str:
    """The experiment name or commit whose dvc.lock holds the results of ``model_name``'s
    ``@champion``: what ``dvc plots diff`` needs to compare the workspace with it."""
    from dvc.repo import Repo

    run_id = registry.alias_run_id(model_name, CHAMPION)
    if run_id is None:
        raise StageError(f"no version of {model_name} is @{CHAMPION}: run the pipeline first")
    tags = runs.get_run(run_id).data.tags
    experiments = experiment_refs(repo)
    own = tags.get(TAG_DVC_EXP_NAME)
    candidates = [(own, experiments[own])] if own in experiments else []
    candidates += [(name, commit) for name, commit in experiments.items() if name != own]
    commits = _git(repo, "log", f"-n{COMMITS_SEARCHED}", "--format=%h", "--", "dvc.lock")
    candidates += [(commit, commit) for commit in (commits or "").split()]
    with Repo(str(repo)) as dvc_repo:
        cache = dvc_repo.cache.local
        for rev, commit in candidates:
            if _recorded_run_id(repo, commit, cache.oid_to_path) == run_id:
                log.info("the champion's run %s is recorded by %s", run_id, rev)
                return rev
    missing = f"no experiment or commit of dvc.lock records the champion's run {run_id}"
    if own:
        raise StageError(
            f"{missing}: its DVC experiment {own} is not in this repository "
            "(dvc exp list; dvc exp pull if it was pushed)"
        )
    raise StageError(
        f"{missing}: if its results are the workspace's, commit them "
        "(git add dvc.lock && git commit) to compare later runs against them"
    )
