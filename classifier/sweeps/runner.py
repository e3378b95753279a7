"""Run a sweep: queue its trials as DVC experiments, follow them, record them in MLflow.

One loop for a grid and a search. It keeps the DVC queue fed (a grid: two trials per
worker; a search: one per worker, each asked of Optuna when a result comes back),
starts DVC's workers (``dvc queue start -j N``), and as each trial ends reads its metric
from its experiment's commit, tells the study, and tags the trial's MLflow run. The sweep's own
MLflow run is the parent of every trial's run. At the end it writes the report and logs
it, the figures and the best trial to the parent run.

Ctrl-C (or SIGTERM) stops the trials the sweep started (``dvc queue kill``: their runs
end KILLED) and drops the queued ones; running the same command again resumes. After a
crash the trials go on in DVC's workers and a resumed sweep picks up their results. A
trial DVC's worker lost (Running, with no process) is stopped and asked for again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classifier.sweeps import queue, report, study
from classifier.sweeps.resources import Share, cpu_count, plan_share, visible_gpus
from classifier.sweeps.spec import SweepSpec, load_spec
from classifier.tracking import parents, runs
from classifier.tracking.store import TrackingError
from classifier.training.trial import TrialSetup, trial_file, write_setup

log = logging.getLogger(__name__)

SWEEPS_DIR = Path("sweeps")
POLL_S = 2.0
# A grid keeps this many trials per worker in DVC's queue.
GRID_AHEAD = 2
# DVC's workers stop after 10 idle seconds: if trials wait with fewer running than there
# are workers for this long, start them again.
RESTART_WORKERS_S = 12.0
# How long Ctrl-C waits for the trials it interrupted to end and mark their runs KILLED.
STOP_WAIT_S = 60.0
DEFAULT_UI = "http://127.0.0.1:5000"
COMPLETE, FAILED, KILLED = "COMPLETE", "FAILED", "KILLED"
# A trial the sweep queued that DVC no longer knows (`dvc queue remove`), for this long.
REMOVED = "Removed"
MISSING_S = 15.0
# A trial DVC calls Running with no process for this long was lost by DVC's worker (see
# queue.without_process): the sweep stops it (`dvc queue kill`) and asks for it again.
LOST_S = 60.0
LOST_CHECK_S = 15.0
LOST_ERROR = "DVC's worker took it from the queue and stopped without running it; run again"


@dataclass(frozen=True)
class SweepResult:
    spec: SweepSpec
    folder: Path
    report: Path
    parent_run_id: str
    trials: list[report.TrialRow]
    best: report.TrialRow | None


def sweep_folder(root: Path, spec: SweepSpec) -> Path:
    """Where a sweep keeps its study, report and figures: ``sweeps/<name>/`` (git-ignored)."""
    return Path(root) / SWEEPS_DIR / spec.name


@dataclass
class Driver:
    """One run of the sweep loop: the study, the DVC queue and the parent run."""

    spec: SweepSpec
    root: Path
    study: Any
    parent_id: str
    experiment_id: str
    share: Share
    baseline: str
    in_flight: dict[int, Any] = field(default_factory=dict)  # trial number -> optuna Trial
    workers_started: float = 0.0
    missing_since: dict[int, float] = field(default_factory=dict)
    lost_since: dict[int, float] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)  # stopped in DVC; to be asked for again
    lost_checked: float = 0.0

    def name(self, number: int) -> str:
        return study.trial_name(self.spec, number)

    def limit(self) -> int:
        """Trials in DVC's queue at once. A grid keeps a trial waiting for each worker, so
        a worker that finishes starts the next at once; a search asks for each next point
        only when a worker is free, so that it learns from every result so far."""
        return self.spec.workers * (GRID_AHEAD if self.spec.kind == "grid" else 1)

    def dvc_states(self) -> dict[str, str]:
        states = queue.statuses(self.root)
        missing = [self.name(n) for n in self.in_flight if self.name(n) not in states]
        if missing:  # the queue's records were cleaned (make clean): finished ones remain
            names = queue.experiment_names(self.root)
            states.update({name: queue.SUCCESS for name in missing if name in names})
        return states

    def state_of(self, number: int, states: dict[str, str]) -> str:
        """DVC's state of trial ``number``; REMOVED once DVC has not known it for a while
        (a message moving from the queue to a worker is briefly in neither list)."""
        state = states.get(self.name(number))
        if state is not None:
            self.missing_since.pop(number, None)
            return state
        since = self.missing_since.setdefault(number, time.monotonic())
        return REMOVED if time.monotonic() - since > MISSING_S else queue.QUEUED

    def resume(self) -> None:
        """Follow the trials a stopped sweep left asked for; queue those DVC never got."""
        import optuna

        left = study.running(self.study)
        if not left:
            return
        for frozen in left:
            # The study's own handle on a trial it asked for earlier (Optuna's constructor).
            self.in_flight[frozen.number] = optuna.trial.Trial(self.study, frozen._trial_id)
        unknown = set(self.in_flight)
        for _ in range(2):  # twice: a trial moving to a worker is briefly in neither list
            states = self.dvc_states()
            unknown = {number for number in unknown if self.name(number) not in states}
            if unknown:
                time.sleep(POLL_S)
        for number in sorted(unknown):
            self.queue(self.in_flight[number])
        log.info("resuming sweep %s: %d trials in flight", self.spec.name, len(self.in_flight))

    def queue(self, trial: Any) -> None:
        name = self.name(trial.number)
        trial.set_user_attr(study.ATTR_NAME, name)
        trial.set_user_attr(study.ATTR_BASELINE, self.baseline)
        setup = TrialSetup(self.spec.name, self.parent_id, self.share.threads, self.share.devices)
        write_setup(self.root, name, setup)
        queue.queue_trial(self.root, name, self.spec.overrides(trial.params), self.spec.target)
        shown = ", ".join(f"{key}={value!r}" for key, value in trial.params.items())
        log.info("queued %s: %s", name, shown)

    def fill(self) -> None:
        """Ask for trials until the queue holds its share or the budget is spent."""
        distributions = study.distributions(self.spec)
        queued = 0
        while (
            len(self.in_flight) < self.limit()
            and study.counted(self.study) + len(self.in_flight) < self.spec.trials
            and (self.spec.kind == "search" or study.waiting(self.study) > 0)
        ):
            trial = self.study.ask(distributions)
            self.in_flight[trial.number] = trial
            self.queue(trial)
            queued += 1
            if queued == self.spec.workers:  # let the workers start on these
                self.start_workers()
        if queued:
            self.start_workers()

    def start_workers(self) -> None:
        queue.start_workers(self.root, self.spec.workers, self.share.worker_env())
        self.workers_started = time.monotonic()

    def keep_workers(self, states: dict[str, str]) -> None:
        """Start DVC's workers again if trials wait while workers are missing."""
        ours = [states.get(self.name(number)) for number in self.in_flight]
        running = sum(state == queue.RUNNING for state in ours)
        waiting = queue.QUEUED in ours and running < self.spec.workers
        if waiting and time.monotonic() - self.workers_started > RESTART_WORKERS_S:
            self.start_workers()

    def find_lost(self, states: dict[str, str]) -> None:
        """Stop trials DVC has called Running, with no process, for LOST_S: DVC then calls
        them Failed, and ``collect`` asks for each again under a new name."""
        now = time.monotonic()
        running = {
            self.name(n): n for n in self.in_flight if states.get(self.name(n)) == queue.RUNNING
        }
        if not running or now - self.lost_checked < LOST_CHECK_S:
            return
        self.lost_checked = now
        lost = queue.without_process(self.root, running)
        for name, number in running.items():
            if name not in lost:
                self.lost_since.pop(number, None)
            elif now - self.lost_since.setdefault(number, now) >= LOST_S:
                log.warning("%s: DVC shows it Running, but no process runs it; stopping it", name)
                # DVC marks it Failed, unless a worker does run it after all (an error).
                if queue.stop(self.root, [name], []):
                    self.lost.add(number)
                self.lost_since.pop(number, None)

    def collect(self, done: dict[int, str]) -> None:
        """Record trials DVC finished: their metric or failure, in the study and MLflow."""
        children = parents.children(self.experiment_id, self.parent_id)
        for number, dvc_state in done.items():
            trial = self.in_flight.pop(number)
            name = self.name(number)
            if number in self.lost:
                self.lost.discard(number)
                log.warning("%s: %s", name, LOST_ERROR)
                self.ask_again(trial, None, LOST_ERROR)
                continue
            child = children.get(name)
            value, error = None, ""
            if dvc_state == queue.SUCCESS:
                value = queue.metric(self.root, name, self.spec.metric_file, self.spec.metric_key)
                if value is None:
                    error = f"no finite {self.spec.metric_key} in {self.spec.metric_file} of {name}"
            elif dvc_state == REMOVED:
                error = "removed from DVC's queue before it ran"
            else:
                error = queue.failure(self.root, name)
            state, run_id = self.record_run(name, trial.params, child, error)
            trial.set_user_attr(study.ATTR_STATE, state)
            trial.set_user_attr(study.ATTR_RUN, run_id or "")
            trial.set_user_attr(study.ATTR_ERROR, error)
            if state == COMPLETE:
                self.study.tell(trial, value)
                log.info("%s: %s %.6g", name, self.spec.metric, value)
            else:
                self.study.tell(trial, state=_fail())
                log.warning("%s %s: %s", name, state, error)
            trial_file(self.root, name).unlink(missing_ok=True)

    def record_run(
        self, name: str, params: dict[str, Any], child: Any, error: str
    ) -> tuple[str, str | None]:
        """The trial's state (COMPLETE, FAILED, KILLED) and MLflow run, tagged as the sweep's."""
        if child is None and error:
            overrides = self.spec.overrides(params)
            run_id = parents.failed_child(
                self.experiment_id, self.parent_id, name, overrides, error
            )
            return FAILED, run_id
        if child is None:
            # Nothing the trial depends on changed (the baseline's params, say), so DVC
            # reused an earlier result and no training ran: record that run's numbers.
            source = queue.train_run_id(self.root, name)
            if source is not None:
                run_id = parents.reused_child(self.experiment_id, self.parent_id, name, source)
                parents.tag_run(
                    run_id, {parents.TAG_SWEEP: self.spec.name, parents.TAG_STATE: COMPLETE}
                )
                log.info("%s: DVC reused run %s (nothing changed)", name, source)
                return COMPLETE, run_id
            log.warning(
                "%s: no MLflow run under parent %s; do DVC's workers log to another store "
                "(MLFLOW_TRACKING_URI)?",
                name,
                self.parent_id,
            )
            return COMPLETE, None
        run_id = child.info.run_id
        status = child.info.status
        if status == "RUNNING":  # its process was killed outright (SIGKILL)
            parents.close_dead_runs(self.experiment_id)
            status = parents.status(run_id)
        interrupted = status == "KILLED" or any(
            key.endswith(".outcome") and value == "KILLED" for key, value in child.data.tags.items()
        )
        state = COMPLETE if not error else KILLED if interrupted else FAILED
        if state != COMPLETE and status != state:  # training finished, a later stage did not
            parents.end_trial_run(run_id, state)
        tags = {parents.TAG_SWEEP: self.spec.name, parents.TAG_STATE: state}
        if error:
            tags[parents.TAG_ERROR] = error
        parents.tag_run(run_id, tags)
        return state, run_id

    def loop(self) -> None:
        from tqdm import tqdm

        self.resume()
        with tqdm(
            total=self.spec.trials,
            initial=study.counted(self.study),
            desc=f"sweep {self.spec.name}",
            unit="trial",
        ) as bar:
            while True:
                self.fill()
                if not self.in_flight:
                    return
                time.sleep(POLL_S)
                states = self.dvc_states()
                done = {
                    number: self.state_of(number, states)
                    for number in self.in_flight
                    if self.state_of(number, states) in (*queue.DONE, REMOVED)
                }
                if done:
                    self.collect(done)
                    bar.n = study.counted(self.study)
                    bar.refresh()
                self.find_lost(states)
                self.keep_workers(states)

    def ask_again(self, trial: Any, run_id: str | None, error: str = "") -> None:
        """Record ``trial`` as KILLED, outside the budget, and ask for its params again
        first: in this sweep (a lost trial) or when it resumes (after Ctrl-C)."""
        trial.set_user_attr(study.ATTR_STATE, KILLED)
        trial.set_user_attr(study.ATTR_RUN, run_id or "")
        trial.set_user_attr(study.ATTR_INTERRUPTED, True)
        if error:
            trial.set_user_attr(study.ATTR_ERROR, error)
        self.study.tell(trial, state=_fail())
        self.study.enqueue_trial(trial.params)
        trial_file(self.root, self.name(trial.number)).unlink(missing_ok=True)

    def stop(self) -> None:
        """After Ctrl-C: stop this sweep's trials; a resumed sweep runs them again.

        Trials DVC finished before the interrupt reached them are recorded as usual; running
        ones are interrupted (``dvc queue kill``: their runs end KILLED), queued ones dropped.
        """
        asked: set[str] = set()
        deadline = time.monotonic() + STOP_WAIT_S
        while self.in_flight and time.monotonic() < deadline:
            states = self.dvc_states()
            finished, kill, drop = {}, [], []
            for number in self.in_flight:
                name, state = self.name(number), states.get(self.name(number))
                if state == queue.SUCCESS or (state == queue.FAILED and name not in asked):
                    finished[number] = state
                elif state == queue.RUNNING and name not in asked:
                    kill.append(name)
                elif state == queue.QUEUED and name not in asked:
                    drop.append(name)
            queue.stop(self.root, kill, drop)  # first: every second here is training
            asked.update(kill + drop)
            if finished:
                self.collect(finished)
            if all(
                self.name(n) in asked and states.get(self.name(n)) in (queue.FAILED, None)
                for n in self.in_flight
            ):
                break
            time.sleep(POLL_S)
        parents.close_dead_runs(self.experiment_id)
        children = parents.children(self.experiment_id, self.parent_id)
        stopped = len(self.in_flight)
        for number, trial in list(self.in_flight.items()):
            name = self.name(number)
            child = children.get(name)
            if child is not None:
                parents.tag_run(child.info.run_id, {parents.TAG_STATE: KILLED})
                if child.info.status != KILLED:  # training finished; evaluate was stopped
                    parents.end_trial_run(child.info.run_id, KILLED)
            self.ask_again(trial, child.info.run_id if child else None)
        self.in_flight.clear()
        log.warning(
            "sweep %s stopped: %d trials interrupted; run the same command to resume",
            self.spec.name,
            stopped,
        )


def _fail() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL


def _parent_params(spec: SweepSpec, share: Share) -> dict[str, Any]:
    params: dict[str, Any] = {
        "sweep.kind": spec.kind,
        "sweep.metric": spec.metric,
        "sweep.direction": spec.direction,
        "sweep.trials": spec.trials,
        "sweep.threads_per_trial": share.threads,
    }
    for param in spec.params:
        params[f"sweep.{param.key}"] = (
            list(param.choices)
            if param.choices is not None
            else f"{param.low}..{param.high}{' log' if param.log else ''}"
        )
    params.update({f"sweep.set.{key}": value for key, value in spec.fixed.items()})
    return params


def _existing_parent(run_id: str | None) -> str | None:
    """The parent run a stopped sweep recorded, if the store still has it."""
    if not run_id:
        return None
    try:
        runs.get_run(run_id)
    except TrackingError as error:
        log.warning("starting a new parent run: %s", error)
        return None
    return run_id


def run_sweep(spec_path: Path, root: Path = Path("."), ui_url: str = DEFAULT_UI) -> SweepResult:
    """Run (or resume) the sweep ``spec_path`` describes in the project at ``root``."""
    root = Path(root).resolve()
    spec = load_spec(spec_path, root / "params.yaml", root / "dvc.yaml")
    folder = sweep_folder(root, spec)
    sweep_study = study.open_study(spec, folder)
    share = plan_share(spec.workers, cpu_count(), visible_gpus())
    baseline = queue.head(root)
    previous = _existing_parent(sweep_study.user_attrs.get(study.ATTR_PARENT))
    with parents.parent_run(spec.name, _parent_params(spec, share), previous) as (
        parent_id,
        experiment_id,
    ):
        sweep_study.set_user_attr(study.ATTR_PARENT, parent_id)
        runs.log_artifact(spec.path, "sweep")
        log.info(
            "sweep %s: %d %s trials on %d workers, %d threads each%s; MLflow parent run %s",
            spec.name,
            spec.trials,
            spec.kind,
            spec.workers,
            share.threads,
            f", GPUs {','.join(share.devices)}" if share.devices else "",
            parent_id,
        )
        driver = Driver(spec, root, sweep_study, parent_id, experiment_id, share, baseline)
        try:
            driver.loop()
        except KeyboardInterrupt:
            driver.stop()
            raise
        parents.close_dead_runs(experiment_id)
        children = parents.children(experiment_id, parent_id)
        rows = report.trial_rows(spec, sweep_study, children)
        written = report.write_report(
            spec, folder, rows, study.importances(sweep_study), experiment_id, parent_id, ui_url
        )
        best = report.best_row(spec, rows)
        report.log_to_parent(spec, folder, written, best)
    if best is not None:
        log.info("best: %s with %s %.6g", best.name, spec.metric, best.value)
    log.info("report: %s", written)
    return SweepResult(spec, folder, written, parent_id, rows, best)
