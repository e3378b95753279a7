"""Send a sweep's best trial through the same gate as any model.

``dvc exp apply <best>`` brings the winner's params, dvc.lock and outputs into the
workspace; ``dvc repro`` then runs what trials leave out, export, which registers the
model and decides on the evidence whether it becomes ``@champion`` or stays
``@challenger`` (classifier/export/promotion.py). A sweep never sets an alias itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classifier.errors import StageError
from classifier.sweeps import queue, report, study
from classifier.sweeps.runner import sweep_folder
from classifier.sweeps.spec import load_spec

log = logging.getLogger(__name__)

DECISION = Path("metrics/promotion.json")
REGISTERED = Path("lineage/registered_model.json")


@dataclass(frozen=True)
class Promotion:
    trial: str
    metric: str
    value: float
    decision: dict[str, Any]
    registered: dict[str, Any]


def promote_best(spec_path: Path, root: Path = Path(".")) -> Promotion:
    """Apply the best trial of the sweep ``spec_path`` describes, then run export."""
    root = Path(root).resolve()
    spec = load_spec(spec_path, root / "params.yaml", root / "dvc.yaml")
    folder = sweep_folder(root, spec)
    found = study.load_study(spec, folder)
    if found is None:
        raise StageError(f"{folder}: no sweep {spec.name!r} ran here; run it first")
    best = report.best_row(spec, report.trial_rows(spec, found, {}))
    if best is None:
        raise StageError(f"sweep {spec.name!r}: no trial finished with a result to promote")
    log.info("applying %s (%s %.6g)", best.name, spec.metric, best.value)
    try:
        queue.dvc(root, "exp", "apply", best.name)
    except queue.QueueError as error:
        # Outputs of stages the trials skip (export) may be missing from the cache when the
        # baseline never ran them; DVC then says so after applying everything else.
        if "Checkout failed" not in str(error):
            raise
        log.warning("%s; dvc repro runs what is missing", error)
    log.info("dvc repro: export decides whether %s becomes the champion", best.name)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=root, env=queue.dvc_env(), check=False
    )
    if done.returncode != 0:
        raise StageError(
            f"dvc repro failed after applying {best.name} (exit code {done.returncode}); "
            "its params are in the workspace: fix the cause and run dvc repro"
        )
    decision = json.loads((root / DECISION).read_text())
    registered = json.loads((root / REGISTERED).read_text())
    return Promotion(best.name, spec.metric, best.value, decision, registered)
