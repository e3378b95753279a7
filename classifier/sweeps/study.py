"""The sweep's record: an Optuna study in a journal file, for a grid as for a search.

Trial ``k`` of the study is DVC experiment ``<sweep>-<k+1>``. The study is written to
``sweeps/<name>/study.log`` (Optuna's append-only journal) as each trial is asked for,
queued and told its result, so a sweep stopped by Ctrl-C or a crash resumes where it
was: finished trials keep their results and are never run again.

- A grid is a study whose trials are enqueued up front, one per grid point.
- A search asks Optuna's TPE sampler for each next trial as results arrive (with
  ``constant_liar``, so trials asked for while others run are not the same point).
- A trial the sweep stopped itself (Ctrl-C) is marked ``interrupted`` and its params are
  enqueued again: a resumed sweep runs them first, under the next free number. It does not
  count against the budget; every other failure does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from classifier.sweeps.spec import SpecError, SweepSpec

log = logging.getLogger(__name__)

STUDY_FILE = "study.log"
ATTR_SPEC = "spec"
ATTR_PARENT = "parent_run_id"
ATTR_NAME, ATTR_STATE, ATTR_RUN, ATTR_ERROR = "name", "state", "run_id", "error"
ATTR_BASELINE, ATTR_INTERRUPTED = "baseline", "interrupted"
# Random trials before TPE models the results: a third of the budget, 2 to 10.
MIN_STARTUP, MAX_STARTUP = 2, 10


def trial_name(spec: SweepSpec, number: int) -> str:
    return f"{spec.name}-{number + 1}"


def signature(spec: SweepSpec) -> str:
    """What makes two runs of a spec the same sweep (workers and budget may change)."""
    return json.dumps(
        {
            "kind": spec.kind,
            "metric": spec.metric,
            "direction": spec.direction,
            "set": spec.fixed,
            "params": [vars(param) for param in spec.params],
        },
        sort_keys=True,
        default=str,
    )


def distributions(spec: SweepSpec) -> dict[str, Any]:
    """Optuna's distribution of each varied param (a grid's are lists of choices)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    found: dict[str, Any] = {}
    for param in spec.params:
        if param.choices is not None:
            found[param.key] = CategoricalDistribution(list(param.choices))
        elif param.integer:
            found[param.key] = IntDistribution(
                int(param.low), int(param.high), log=param.log, step=int(param.step or 1)
            )
        else:
            found[param.key] = FloatDistribution(
                float(param.low), float(param.high), log=param.log, step=param.step
            )
    return found


def open_study(spec: SweepSpec, folder: Path) -> Any:
    """The sweep's study, new or as a stopped sweep left it; a grid's points enqueued."""
    import optuna
    from optuna.samplers import TPESampler
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))
    existing = optuna.study.get_all_study_names(storage)
    previous = (
        optuna.load_study(study_name=spec.name, storage=storage) if spec.name in existing else None
    )
    # A sampler seeded afresh would draw its first points again: seed it past the history.
    history = 0 if previous is None else len(previous.trials)
    startup = min(MAX_STARTUP, max(MIN_STARTUP, spec.trials // 3))
    sampler = TPESampler(seed=spec.seed + history, n_startup_trials=startup, constant_liar=True)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.direction,
        sampler=sampler,
        load_if_exists=True,
    )
    recorded = study.user_attrs.get(ATTR_SPEC)
    if recorded is None:
        study.set_user_attr(ATTR_SPEC, signature(spec))
    elif recorded != signature(spec):
        raise SpecError(
            f"{spec.path}: {folder} holds sweep {spec.name!r} of a different spec (only "
            "workers and search.trials may change to resume it); give the new spec another "
            f"name, or delete {folder} to start again"
        )
    if spec.kind == "grid":
        _enqueue_grid(spec, study)
    return study


def _enqueue_grid(spec: SweepSpec, study: Any) -> None:
    """Enqueue every grid point no trial holds yet (all of them, for a new study)."""
    held = [trial.params or trial.system_attrs.get("fixed_params", {}) for trial in study.trials]
    for point in spec.grid_points():
        if point not in held:
            study.enqueue_trial(point)


def counted(study: Any) -> int:
    """Trials that count against the budget: finished ones, except those the sweep stopped."""
    from optuna.trial import TrialState

    return sum(
        trial.state in (TrialState.COMPLETE, TrialState.FAIL)
        and not trial.user_attrs.get(ATTR_INTERRUPTED)
        for trial in study.trials
    )


def waiting(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(trial.state == TrialState.WAITING for trial in study.trials)


def running(study: Any) -> list[Any]:
    """Trials asked for and not yet told: queued or running in DVC, or about to be."""
    from optuna.trial import TrialState

    return [trial for trial in study.trials if trial.state == TrialState.RUNNING]


def importances(study: Any) -> dict[str, float] | None:
    """Each param's share of the metric's variance (fANOVA); None with too few results."""
    import optuna
    from optuna.trial import TrialState

    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    keys = {key for trial in complete for key in trial.params}
    varied = [k for k in keys if len({repr(t.params.get(k)) for t in complete}) > 1]
    if len(complete) < 3 or not varied:
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=evaluator, params=sorted(varied)
        )
    except (ValueError, RuntimeError) as error:
        log.info("no param importances: %s", error)
        return None
    return {key: float(value) for key, value in found.items()}


def load_study(spec: SweepSpec, folder: Path) -> Any | None:
    """The study a sweep left in ``folder``, to read; None if no sweep ran there."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = folder / STUDY_FILE
    if not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    if spec.name not in optuna.study.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=spec.name, storage=storage)
