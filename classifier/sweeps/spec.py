"""The sweep spec: a small YAML file, checked as strictly as params.yaml.

A grid (every combination of some values)::

    metric: metrics/train.json:val_loss   # a metrics file of dvc.yaml, and a key in it
    direction: minimize
    workers: 2
    set: {train.epochs: 8}                # the same for every trial
    grid:
      train.learning_rate: [0.0003, 0.001, 0.003]
      train.batch_size: {low: 32, high: 96, step: 32}    # 32, 64, 96

or a search (Optuna's TPE sampler, ``trials`` of them)::

    search:
      trials: 20
      seed: 0
      params:
        train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
        train.batch_size: [32, 64, 128]                 # one of these

An unknown key, in the spec or among the params, is named; every value is checked by
building the params it produces with classifier/config.py (every grid point; a search's
bounds and choices), so a value params.yaml would reject fails here, before any trial.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from classifier.config import DEFAULT_PARAMS_PATH, parse_params, read_yaml
from classifier.errors import ParamsError, StageError

DVC_YAML = Path("dvc.yaml")
# Trials run the pipeline up to the stage that writes the metric (train or evaluate): a
# metric of train spares every trial the evaluate stage. Export registers models, so only
# the winner goes through it (python -m tools.sweep SPEC --promote).
NOT_IN_TRIALS = ("export",)
# A sweep's name begins each trial's DVC experiment name, so it must suit a git ref.
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,60}$")
MAX_TRIALS = 10_000


class SpecError(StageError):
    """The sweep spec is missing, malformed, or asks for something params.yaml rejects."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Range(_Strict):
    """Numbers from ``low`` to ``high``: a grid takes ``step`` apart or ``num`` of them; a
    search samples between them (on a log scale with ``log``)."""

    low: float
    high: float
    step: float | None = Field(default=None, gt=0)
    num: int | None = Field(default=None, ge=1, le=MAX_TRIALS)
    log: bool = False


class Search(_Strict):
    trials: int = Field(ge=1, le=MAX_TRIALS)
    seed: int = Field(default=0, ge=0)
    params: dict[str, Any]


class SpecFile(_Strict):
    name: str | None = None
    metric: str
    direction: Literal["minimize", "maximize"]
    workers: int = Field(default=1, ge=1, le=64)
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] | None = None
    search: Search | None = None


@dataclass(frozen=True)
class Param:
    """One varied param: a list of values (a grid's, or a search's choices), or a range."""

    key: str
    choices: tuple[Any, ...] | None
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to vary, what to optimise, how many workers."""

    path: Path
    name: str
    metric_file: str
    metric_key: str
    direction: str
    workers: int
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    kind: Literal["grid", "search"]
    trials: int  # a grid's points, a search's budget
    seed: int = 0
    target: str = "evaluate"  # the stage trials run up to: the one writing the metric

    @property
    def metric(self) -> str:
        return f"{self.metric_file}:{self.metric_key}"

    @property
    def keys(self) -> list[str]:
        return [param.key for param in self.params]

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of a grid's values, the first param varying slowest."""
        values = [param.choices or () for param in self.params]
        return [dict(zip(self.keys, point, strict=True)) for point in itertools.product(*values)]

    def overrides(self, point: dict[str, Any]) -> dict[str, Any]:
        """What a trial sets: the fixed values, then the trial's own."""
        return {**self.fixed, **point}


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing key"
    message = error["msg"]
    return f"{key}: {message[0].lower()}{message[1:]}, got {error['input']!r}"


def _values(key: str, values: Any, where: str) -> list[Any] | Range:
    """A list of values, or a range checked as strictly as the rest of the spec."""
    if isinstance(values, list):
        return values
    if not isinstance(values, dict):
        raise ValueError(
            f"{where}: {key}: expected a list of values or a range {{low, high, ...}}, "
            f"got {values!r}"
        )
    try:
        return Range.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise ValueError(f"{where}: {key}: {problems}") from None


def _choices(key: str, values: list[Any], where: str) -> tuple[Any, ...]:
    if not values:
        raise ValueError(f"{where}: {key}: no values; give at least one")
    for value in values:
        if value is not None and not isinstance(value, bool | int | float | str):
            raise ValueError(f"{where}: {key}: {value!r}: a value must be a number, text or null")
    if len(set(map(repr, values))) < len(values):
        raise ValueError(f"{where}: {key}: a value is listed twice")
    return tuple(values)


def _expand(key: str, values: Any, where: str, integer: bool) -> tuple[Any, ...]:
    """A grid's values for ``key``: the list, or the range's numbers."""
    values = _values(key, values, where)
    if isinstance(values, list):
        return _choices(key, values, where)
    if (values.step is None) == (values.num is None):
        raise ValueError(f"{where}: {key}: give a range either step or num")
    if values.high < values.low:
        raise ValueError(f"{where}: {key}: high {values.high:g} is below low {values.low:g}")
    if values.step is not None:
        count = math.floor((values.high - values.low) / values.step + 1e-9) + 1
        numbers = [values.low + index * values.step for index in range(count)]
    elif values.log:
        if values.low <= 0:
            raise ValueError(f"{where}: {key}: a log range needs low > 0")
        ratio = (values.high / values.low) ** (1 / max(values.num - 1, 1))
        numbers = [values.low * ratio**index for index in range(values.num)]
    else:
        gap = (values.high - values.low) / max(values.num - 1, 1)
        numbers = [values.low + index * gap for index in range(values.num)]
    if len(numbers) > MAX_TRIALS:
        raise ValueError(f"{where}: {key}: {len(numbers)} values; at most {MAX_TRIALS}")
    return tuple(round(n) if integer else float(f"{n:.10g}") for n in numbers)


def _search_param(key: str, values: Any, integer: bool) -> Param:
    where = "search.params"
    values = _values(key, values, where)
    if isinstance(values, list):
        return Param(key, _choices(key, values, where))
    if values.num is not None:
        raise ValueError(f"{where}: {key}: num is for a grid; a search samples low..high")
    if values.high <= values.low:
        raise ValueError(f"{where}: {key}: high {values.high:g} must be above low {values.low:g}")
    if values.log and values.low <= 0:
        raise ValueError(f"{where}: {key}: a log range needs low > 0")
    if values.log and values.step is not None:
        raise ValueError(f"{where}: {key}: give a range step or log, not both")
    if integer:
        if values.low != round(values.low) or values.high != round(values.high):
            raise ValueError(f"{where}: {key}: an integer param needs whole low and high")
        step = None if values.step is None else max(1, round(values.step))
        low, high = round(values.low), round(values.high)
        return Param(key, None, low, high, step, values.log, integer=True)
    return Param(key, None, values.low, values.high, values.step, values.log)


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in raw.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's mapping with dotted ``overrides`` set, as ``dvc exp run -S`` would."""
    changed = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        changed[section][name] = value
    return changed


def _check_values(
    raw: dict[str, Any], overrides: dict[str, Any], where: str, params_path: Path
) -> None:
    try:
        parse_params(apply_overrides(raw, overrides), str(params_path))
    except ParamsError as error:
        shown = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        reason = str(error).removeprefix(f"{params_path}: ")
        raise ValueError(f"{where} {shown}: {params_path} would reject it: {reason}") from None


def _metric_stage(metric: str, dvc_yaml: Path) -> tuple[str, str, str]:
    """The metric's file, key and stage; the file must be a metrics file of a stage trials
    run."""
    file, sep, key = metric.rpartition(":")
    if not sep or not file or not key:
        raise ValueError(
            f"metric: expected <metrics file>:<key> as `dvc exp show` names it "
            f"(metrics/evaluate.json:accuracy), got {metric!r}"
        )
    stages = (read_yaml(dvc_yaml) or {}).get("stages") or {}
    owners = [
        name
        for name, stage in stages.items()
        for item in stage.get("metrics") or []
        if (next(iter(item)) if isinstance(item, dict) else item) == file
    ]
    if not owners:
        known = sorted(
            (next(iter(item)) if isinstance(item, dict) else item)
            for stage in stages.values()
            for item in stage.get("metrics") or []
        )
        raise ValueError(f"metric: {file} is not a metrics file of {dvc_yaml} ({', '.join(known)})")
    if owners[0] in NOT_IN_TRIALS:
        raise ValueError(
            f"metric: {file} is written by {owners[0]}, which trials do not run (it registers "
            "models; only the winner goes through it): choose a metric of train or evaluate"
        )
    return file, key, owners[0]


def _build(file: SpecFile, path: Path, params_path: Path, dvc_yaml: Path) -> SweepSpec:
    raw = read_yaml(params_path)
    known = _flat(raw if isinstance(raw, dict) else {})
    name = path.stem if file.name is None else file.name
    if not NAME.match(name):
        raise ValueError(
            f"name: {name!r} must start with a letter and hold only letters, digits, - and _ "
            "(it begins each trial's DVC experiment name)"
        )
    if (file.grid is None) == (file.search is None):
        raise ValueError("give either grid or search (and not both)")
    metric_file, metric_key, target = _metric_stage(file.metric, dvc_yaml)
    varied = file.grid if file.grid is not None else file.search.params
    section = "grid" if file.grid is not None else "search.params"
    if not varied:
        raise ValueError(f"{section}: empty; name at least one param to vary")
    for where, keys in (("set", file.set), (section, varied)):
        for key in keys:
            if key not in known:
                raise ValueError(f"{where}: {key}: unknown param (not in {params_path})")
    both = sorted(set(file.set) & set(varied))
    if both:
        raise ValueError(f"set: {', '.join(both)}: also varied in {section}; keep one")
    _check_values(raw, file.set, "set:", params_path)

    def integer(key: str) -> bool:
        return type(known[key]) is int

    if file.grid is not None:
        params = tuple(
            Param(key, _expand(key, values, "grid", integer(key)))
            for key, values in file.grid.items()
        )
        trials, seed = math.prod(len(param.choices) for param in params), 0
        if trials > MAX_TRIALS:
            raise ValueError(f"grid: {trials} trials; at most {MAX_TRIALS}")
    else:
        params = tuple(_search_param(k, v, integer(k)) for k, v in varied.items())
        trials, seed = file.search.trials, file.search.seed
    spec = SweepSpec(
        path, name, metric_file, metric_key, file.direction, file.workers, dict(file.set),
        params, "grid" if file.grid is not None else "search", trials, seed, target,
    )  # fmt: skip
    if spec.kind == "grid":
        for point in spec.grid_points():
            _check_values(raw, spec.overrides(point), "grid point", params_path)
    else:
        for param in params:
            ends = param.choices if param.choices is not None else (param.low, param.high)
            for value in ends:
                _check_values(raw, spec.overrides({param.key: value}), section, params_path)
    return spec


def load_spec(
    path: Path, params_path: Path = DEFAULT_PARAMS_PATH, dvc_yaml: Path = DVC_YAML
) -> SweepSpec:
    """Read and check the sweep spec at ``path`` against params.yaml and dvc.yaml.

    Raises SpecError with one line naming the file and what is wrong.
    """
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ParamsError as error:
        raise SpecError(str(error)) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping (metric, direction, grid or search...)")
    try:
        file = SpecFile.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise SpecError(f"{path}: {problems}") from None
    try:
        return _build(file, path, Path(params_path), Path(dvc_yaml))
    except (ValueError, ParamsError) as error:
        raise SpecError(f"{path}: {error}") from None
