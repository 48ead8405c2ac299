"""Ray Tune sweeps: ``lm sweep FILE`` searches a space over an experiment, one Ray Train run per trial.

A sweep is an experiment YAML with a ``search:`` space and a ``tune:`` section (:class:`TuneConfig`)::

    extends: tiny.yaml
    search:                                     # dotted config key -> {kind: args}, never eval'd
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}
      optim.schedule: {grid: [cosine, linear]}
      model.params: {grid: [300000, 1000000]}   # about N parameters (lmplatform.sizes.shape_for_params)
    tune: {num_samples: 2, scheduler: asha, grace_period: 200}

The per-trial budget is the experiment's own ``train.max_steps`` / ``train.max_tokens`` / ``train.max_seconds``.
Each trial runs :func:`lmplatform.train.run_training` as ``train-<trial id>`` under ``<sweep>/trials``, so a
retried or resumed trial continues from its own latest checkpoint, tracked in an MLflow child run of the sweep's
parent run (both found again by tags on a re-run). Rank 0 forwards each dev evaluation to Tune with the loop's
own step and token counters (ASHA's ``time_attr``), through the queue Ray's ``TuneReportCallback`` uses: Train's
callbacks never run in local mode (``ray.num_workers=0``). The driver's :class:`SweepCallback` prints the live
table and ends the child runs Tune stops (ASHA: KILLED) or gives up on (FAILED); :mod:`lmplatform.sweep_report`
then logs the trials table, the plots and the best trial to the parent run and registers the best checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback  # this module runs sweeps: only `lm sweep` and the tests import it

from lm.config import (
    PLATFORM_SECTIONS,
    ConfigError,
    ExperimentConfig,
    build,
    read_raw,
    resolve_paths,
)
from lmplatform.config import PlatformConfig, load_platform_config
from lmplatform.sizes import PARAMS_KEY, count_params, shape_for_params
from lmplatform.train import FAIL_ENV, PlatformError, StopRequest, _fail_at_step, ensure_ray, run_training

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("lmplatform.tune")

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
TRIAL_TAG = "lmlab.trial_id"  # on a child run: the Tune trial it tracks (how a resumed sweep finds it)
SWEEP_TAG = "lmlab.sweep"  # on the parent and its children: the sweep's directory
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
FINISHED = "finished"  # in a trial's last report: it trained its whole budget (not stopped by the scheduler)
_MAX_COMBINATIONS = (
    512  # grids and bounds checked together up to this many combinations, else one key at a time
)
_LIVE_INTERVAL = 5.0  # seconds between live tables while nothing finishes


# --------------------------------------------------------------------------------------------------------------
# Search spaces


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` over ``values`` (choice/grid: the values; uniform/loguniform/randint: lo, hi)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def sampler(self) -> Any:
        """The ray.tune object for this dimension (``randint``'s hi is exclusive, as in ray.tune)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](
            lo, hi
        )

    def candidates(self) -> tuple[Any, ...]:
        """Values that stand for every sample when the config checks them: each value, or both bounds."""
        if self.kind in ("grid", "choice"):
            return self.values
        lo, hi = self.values
        if self.kind == "randint":
            return (lo, hi - 1) if hi - 1 > lo else (lo,)
        # the middle too: integral bounds of a float range on an int key (n_layer: uniform [1, 4]) pass alone
        return (lo, hi, math.sqrt(lo * hi) if self.kind == "loguniform" else (lo + hi) / 2)

    def describe(self) -> str:
        """``loguniform [0.001, 0.01]``: how the parent run's params and the README show it."""
        return f"{self.kind} {json.dumps(list(self.values))}"


def parse_space(search: Any) -> tuple[Dimension, ...]:
    """Read a ``search:`` mapping ``{dotted.key: {kind: args}}`` into dimensions; ConfigError names the key."""
    if search is None or search == {}:
        raise ConfigError(
            "search: is empty: a sweep needs at least one key, e.g. search: {optim.lr: {loguniform: [1e-3, 1e-2]}}"
        )
    if not isinstance(search, Mapping):
        raise ConfigError(
            f"search={search!r} is not allowed: a mapping of dotted config keys to {{kind: args}}"
        )
    # a key given twice (the YAML's `optim.lr`, an override's nested search.optim.lr): the last one counts
    return tuple(_dimension(key, spec) for key, spec in dict(_flat_space(search)).items())


def _flat_space(search: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{optim: {lr: {grid: ..}}}`` (nested YAML, or an override ``search.optim.lr=...``) as ``optim.lr``."""
    for key, spec in search.items():
        dotted = f"{prefix}{key}"
        nested = isinstance(spec, Mapping) and spec and all(isinstance(v, Mapping) for v in spec.values())
        if nested and not any(kind in spec for kind in KINDS):
            yield from _flat_space(spec, f"{dotted}.")
        else:
            yield dotted, spec


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"search.{key}"
    kinds = ", ".join(KINDS)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}={spec!r} is not allowed: one {{kind: args}} with kind one of {kinds}")
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r} (allowed: {kinds})")
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}={args!r} is not allowed: a non-empty list of values")
        if any(isinstance(v, (list, dict)) for v in args):
            raise ConfigError(
                f"{where}.{kind}={args!r} is not allowed: plain values (numbers, strings, booleans)"
            )
        return Dimension(key, kind, tuple(_yaml_number(v) for v in args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}.{kind}={args!r} is not allowed: two bounds [lo, hi]")
    lo, hi = (_number(v, f"{where}.{kind}", kind == "randint") for v in args)
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}={args!r} is not allowed: lo must be < hi")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.{kind}={args!r} is not allowed: loguniform bounds must be > 0")
    return Dimension(key, kind, (lo, hi))


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value: Any) -> Any:
    """``1e-3`` as a float: PyYAML (YAML 1.1) reads a number with an exponent but no dot as a string."""
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value) else value


def _number(value: Any, where: str, integer: bool) -> float | int:
    """A bound as a number; YAML reads ``1e-3`` (no dot) as a string."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{where}: bound {value!r} is not a number")
    if integer:
        if not number.is_integer():
            raise ConfigError(f"{where}: bound {value!r} is not an integer (randint draws integers)")
        return int(number)
    return number


def search_space(dims: tuple[Dimension, ...]) -> dict[str, Any]:
    """Tune's ``param_space``: one flat entry per dotted key."""
    return {d.key: d.sampler() for d in dims}


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any], base_dir: Path) -> ExperimentConfig:
    """The experiment ``base`` (lm's sections, raw) with a trial's ``params`` set, then ``model.params``
    applied to the resulting shape; paths resolved against ``base_dir``."""
    raw = copy.deepcopy(dict(base))
    target = None
    for key, value in params.items():
        if key == PARAMS_KEY:
            target = value
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"search.{key}: {part!r} is a value, not a section")
            node = child
        node[leaf] = value
    cfg = resolve_paths(build(ExperimentConfig, raw), base_dir)
    if target is not None:
        cfg = dataclasses.replace(cfg, model=shape_for_params(target, cfg.model))
    return cfg


def check_space(base: Mapping[str, Any], dims: tuple[Dimension, ...], base_dir: Path) -> None:
    """Fail before any trial starts if some sample would be refused: each key with each of its candidate values
    (every grid/choice value, both bounds of a range), then every combination when there are few enough."""
    lm_sections = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for d in dims:
        section = d.key.split(".")[0]
        if d.key != PARAMS_KEY and section in PLATFORM_SECTIONS:
            raise ConfigError(
                f"search.{d.key}: only experiment keys can be searched ({', '.join(sorted(lm_sections))}, "
                f"or {PARAMS_KEY}); {section}: settings are the sweep's, the same for every trial"
            )
        for value in d.candidates():
            _check(base, {d.key: value}, base_dir)
    combinations = math.prod(len(d.candidates()) for d in dims)
    if len(dims) > 1 and combinations <= _MAX_COMBINATIONS:
        for values in itertools.product(*(d.candidates() for d in dims)):
            _check(base, dict(zip((d.key for d in dims), values)), base_dir)


def _check(base: Mapping[str, Any], params: dict[str, Any], base_dir: Path) -> None:
    try:
        trial_config(base, params, base_dir)
    except ConfigError as exc:
        where = ", ".join(f"search.{k}={v!r}" for k, v in params.items())
        together = " together" if len(params) > 1 else ""
        raise ConfigError(f"{where}{together} is rejected: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# The sweep: what the driver and every trial share


@dataclass(frozen=True)
class Sweep:
    """A sweep as its trials see it (picklable): the experiment without its space, the platform, the paths."""

    name: str
    path: str  # <storage>/<name>: Tune's experiment directory; the trials' Train runs are in path/trials
    base: dict[str, Any]  # lm's sections of the YAML, raw (the search keys are set on a copy per trial)
    base_dir: str
    pcfg: PlatformConfig
    dims: tuple[Dimension, ...]
    parent_run_id: str | None = None
    fail_at_step: int | None = None  # LMLAB_FAIL_AT_STEP from the driver's environment (testing aid)

    @property
    def keys(self) -> list[str]:
        """The searched keys, in the YAML's order."""
        return [d.key for d in self.dims]

    @property
    def trials_dir(self) -> Path:
        """Where the trials' Ray Train runs (and the loop's checkpoints) live: one directory per trial."""
        return Path(self.path) / "trials"

    def config(self, params: Mapping[str, Any]) -> ExperimentConfig:
        """A trial's experiment."""
        return trial_config(self.base, params, Path(self.base_dir))

    def trial_platform(self, trial_id: str) -> PlatformConfig:
        """The platform of one trial: its own Train run, never registered (the driver registers the best)."""
        pcfg = self.pcfg
        ray = dataclasses.replace(pcfg.ray, storage_path=str(self.trials_dir), run_name=f"train-{trial_id}")
        tracking = dataclasses.replace(pcfg.tracking, register_model=False)
        return dataclasses.replace(pcfg, ray=ray, tracking=tracking)

    def run_dir(self, trial_id: str) -> Path:
        """A trial's run directory (its best checkpoint is ``best/`` there)."""
        return self.trials_dir / f"train-{trial_id}"


def load_sweep(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), base_dir: Path | None = None
) -> Sweep:
    """Read and check a sweep YAML; every bad space raises ConfigError before anything starts."""
    base = (base_dir or Path.cwd()).resolve()
    raw = read_raw(path, overrides)
    cfg, pcfg = load_platform_config(path, overrides, base)
    dims = parse_space(raw.get("search"))
    lm_raw = {k: v for k, v in raw.items() if k not in PLATFORM_SECTIONS}
    check_space(lm_raw, dims, base)
    tc = pcfg.tune
    name = tc.name or f"{cfg.name}-sweep"
    key, storage = (
        ("tune.storage_path", tc.storage_path)
        if tc.storage_path
        else ("ray.storage_path", pcfg.ray.storage_path)
    )
    if "://" in storage:  # the driver reads every trial's run directory (best checkpoint, run.json)
        raise ConfigError(
            f"{key}={storage!r} is not allowed for a sweep: a directory (on every node of a cluster: a shared one)"
        )
    storage_dir = (base / Path(storage).expanduser()).resolve()

    return Sweep(
        name=name,
        path=str(storage_dir / name),
        base=lm_raw,
        base_dir=str(base),
        pcfg=pcfg,
        dims=dims,
        fail_at_step=_fail_at_step() if os.environ.get(FAIL_ENV) else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Trials (in Tune's trial actor)


@dataclass
class TrialReporter:
    """Rank 0's reports to Tune: dev metrics with the loop's step and token counters, and ``n_params``.

    In local mode (``queue`` None) the loop runs in the trial's process and calls ``ray.tune.report``. A Train
    worker puts its reports on the trial session's inter-actor queue, as Ray's ``TuneReportCallback`` does from
    the Train controller (whose callbacks never run in local mode); it pickles to the worker as the queue's handle.
    """

    queue: Any
    tokens_per_step: int
    n_params: int
    stop: Any = None  # local mode: the run's StopRequest, for when Tune stops the trial (never pickled)
    last: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # the loop's training clock at its last log line (resumes included)

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Keep the training clock of the loop's log lines: ``time_attr: seconds`` ranks trials by it."""
        if "elapsed_s" in metrics:
            self.seconds = float(metrics["elapsed_s"])

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        if "dev_loss" not in metrics:  # the final val metrics come with the trial's last report
            return
        self.last = _numbers(metrics)
        result = self._result(step, self.last)
        if self.queue is None:
            import ray.tune

            try:
                ray.tune.report(result)
            except SystemExit:  # Tune stops the trial (ASHA): checkpoint at the next step, end the run KILLED
                if self.stop is not None:
                    self.stop.request("stopped by the scheduler")
        else:
            self.queue.put(result)

    def final(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The trial's last result (the trainable returns it): everything the run ended with, flagged finished.

        A worker's last report may still wait in the queue: the session's main thread must take it before the
        function returns, or it blocks for ever putting it behind the function's own end-of-trial result.
        """
        while self.queue is not None and not self.queue.empty():
            time.sleep(0.05)
        if self.queue is not None:
            time.sleep(0.5)  # the main thread's hand-over of the item it just took: microseconds
        return self._result(step, {**self.last, **_numbers(metrics)}) | {FINISHED: 1.0}

    def _result(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        tokens = metrics.get("tokens", step * self.tokens_per_step)
        seconds = metrics.get("train_seconds", self.seconds)  # the final report carries the loop's own total
        return {
            **metrics, "step": float(step), "tokens": float(tokens), "seconds": float(seconds),
            "n_params": float(self.n_params),
        }  # fmt: skip


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def run_trial(params: dict[str, Any], sweep: Sweep) -> dict[str, float] | None:
    """Tune's trainable: train one sample of the space with lmplatform.train, tracked in the trial's child run."""
    import ray.tune
    from ray.train._internal.session import get_session

    from lm.train import RunFinishedError

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = sweep.config(params)
    pcfg = sweep.trial_platform(trial_id)
    if sweep.fail_at_step is not None:
        os.environ[FAIL_ENV] = str(sweep.fail_at_step)
    run_id = None
    if pcfg.tracking.enabled and sweep.parent_run_id is not None:
        run_id = _child_run(sweep, trial_id, params)
    workers = pcfg.ray.num_workers
    session = get_session()
    queue = session._get_or_create_inter_actor_queue() if workers > 0 else None
    stop = _TrialStop(session.stop_event)
    reporter = TrialReporter(
        queue, cfg.tokens_per_step * max(1, workers), count_params(cfg.model), stop if queue is None else None
    )
    try:
        outcome = run_training(cfg, pcfg, stop=stop, mlflow_run_id=run_id, report=reporter)
        if outcome.interrupted:
            return None
        step, metrics = outcome.step, outcome.metrics
    except RunFinishedError as exc:  # it finished, but the driver was killed before Tune recorded it
        step, metrics = exc.step, exc.metrics
    return reporter.final(step, metrics)


class _TrialStop(StopRequest):
    """A trial's stop request, also set once Tune stops the trial (its session's stop event): a Train run torn
    down by that stop then ends KILLED, not FAILED."""

    def __init__(self, tune_stop: threading.Event) -> None:
        super().__init__()
        self.tune_stop = tune_stop

    @property
    def requested(self) -> bool:
        """A stop was requested here, or Tune is stopping the trial."""
        if self.tune_stop.is_set() and self.signal_name is None:
            self.signal_name = "stopped by the scheduler"
        return self.event.is_set() or self.tune_stop.is_set()


def _child_run(sweep: Sweep, trial_id: str, params: Mapping[str, Any]) -> str:
    """The trial's MLflow child run: found by its trial tag (a retry or a resumed sweep), else created."""
    from lmplatform.tracking import mlflow_client

    client = mlflow_client(str(sweep.pcfg.tracking.uri))
    assert sweep.parent_run_id is not None
    found = find_child(client, sweep, trial_id)
    if found is not None:
        return found
    experiment_id = client.get_run(sweep.parent_run_id).info.experiment_id
    tags = {
        PARENT_TAG: sweep.parent_run_id,
        TRIAL_TAG: trial_id,
        SWEEP_TAG: sweep.path,
        "lmlab.trial_params": json.dumps(dict(params), sort_keys=True, default=str),
    }
    return client.create_run(experiment_id, run_name=f"{sweep.name}-{trial_id}", tags=tags).info.run_id


def find_child(client: MlflowClient, sweep: Sweep, trial_id: str) -> str | None:
    """The child run of ``trial_id`` in this sweep's parent run, if there is one."""
    if sweep.parent_run_id is None:
        return None
    experiment_id = client.get_run(sweep.parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------------------------------------------
# Driver: the live table and the child runs' final statuses


class SweepCallback(Callback):
    """Tune callback in the driver: a live table (trial, varied params, status, step, loss) in place of Ray's
    output, and the MLflow status of trials that ended outside their own process (ASHA: KILLED, FAILED)."""

    def __init__(self, sweep: Sweep, stream: Any = None) -> None:
        self.sweep = sweep
        self.stream = stream
        self._client: Any = None
        self._children: dict[str, str] = {}
        self._shown = 0.0
        self._table = ""
        self._lines = 0
        self._trained_ids: set[str] = set()  # trials that trained their whole budget (cached)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config (and callbacks) for restores
        return {"sweep": self.sweep, "stream": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sweep"], state["stream"])  # type: ignore[misc]

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not trained_budget(self.sweep, trial.trial_id, last):  # stopped by the scheduler: the actor dies
            step = int(last.get("step", 0))
            self._end_child(
                trial.trial_id, "KILLED", stopped_note(self.sweep, step, last.get("dev_loss")), step
            )
        self._show(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        from lmplatform.sweep_report import trial_error

        reason = trial_error(trial)
        self._end_child(trial.trial_id, "FAILED", f"failed: {reason}", None, {"lmlab.failure": reason})
        self._show(trials, force=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        from lmplatform.sweep_report import trial_error

        self._print(
            f"trial {trial.trial_id} failed ({trial_error(trial)}); retrying from its last checkpoint"
        )

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._show(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._show(trials, force=True)

    def _end_child(
        self, trial_id: str, status: str, note: str, step: int | None, tags: dict[str, str] | None = None
    ) -> None:
        """End the trial's child run ``status`` unless it already ended (its own process ends it normally)."""
        if not self.sweep.pcfg.tracking.enabled:
            return
        try:
            client = self._mlflow()
            run_id = self._children.get(trial_id) or find_child(client, self.sweep, trial_id)
            if run_id is None:
                return
            self._children[trial_id] = run_id
            run = client.get_run(run_id)
            # a stopped trial's own process may end its run first (KILLED; FAILED when torn down mid-report):
            # the scheduler's stop is what happened, so it is written over
            if run.info.status != "RUNNING" and not (status == "KILLED" and run.info.status != "FINISHED"):
                return
            if status == "KILLED" and "lmlab.failure" in run.data.tags:
                client.delete_tag(run_id, "lmlab.failure")
            from mlflow.entities import RunTag

            all_tags = {"mlflow.note.content": note, **(tags or {})}
            if step is not None:
                all_tags["lmlab.step"] = str(step)
            client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in all_tags.items()])
            client.set_terminated(run_id, status=status, end_time=run.info.end_time or None)
        except Exception as exc:  # a tracking hiccup must not stop the sweep; the final pass tries again
            log.warning("could not end the MLflow run of trial %s: %s", trial_id, exc)

    def _mlflow(self) -> Any:
        if self._client is None:
            from lmplatform.tracking import mlflow_client

            self._client = mlflow_client(str(self.sweep.pcfg.tracking.uri))
        return self._client

    def _show(self, trials: list[Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < _LIVE_INTERVAL:
            return
        stream = self.stream or sys.stdout
        from lmplatform.sweep_report import live_table

        table = live_table(trials, self.sweep.keys, self._trained)
        tty = stream.isatty()
        if not tty and table == self._table and now - self._shown < 60:
            return  # a log file gets a table when something changed, or once a minute
        self._shown, self._table = now, table
        if tty and self._lines:  # redraw in place
            stream.write(f"\x1b[{self._lines}F\x1b[J")
        text = f"[{time.strftime('%H:%M:%S')}] {table}"
        stream.write(text + "\n")
        stream.flush()
        self._lines = text.count("\n") + 1

    def _trained(self, trial: Any) -> bool:
        if trial.trial_id not in self._trained_ids and trained_budget(
            self.sweep, trial.trial_id, trial.last_result or {}
        ):
            self._trained_ids.add(trial.trial_id)
        return trial.trial_id in self._trained_ids

    def _print(self, line: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        self._lines = 0  # never redraw over a message


def stopped_note(sweep: Sweep, step: int | None, dev_loss: float | None) -> str:
    """The description of a child run whose trial the scheduler stopped."""
    note = f"stopped by the {sweep.pcfg.tune.scheduler.upper()} scheduler at step {step or 0:,}"
    return note + (f" (dev loss {dev_loss:.4f})" if dev_loss is not None else "")


def trained_budget(sweep: Sweep, trial_id: str, last: Mapping[str, Any]) -> bool:
    """Whether a trial Tune ended trained its whole budget: its last report says so, or its run directory
    does (the scheduler may stop a trial at its final dev report, after the loop finished)."""
    from lm.checkpoint import read_run_record

    if last.get(FINISHED):
        return True
    with contextlib.suppress(Exception):
        return read_run_record(sweep.run_dir(trial_id)).get("status") == "finished"
    return False


# --------------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class SweepOutcome:
    """What a sweep produced: the trials table, the best trial, the parent run."""

    sweep: Sweep
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    parent_run_id: str | None
    model_version: str | None = None
    alias_note: str | None = None
    summary: str | None = None  # lmplatform.scaling.report's, for study: scaling
    interrupted: bool = False


def run_sweep(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    base_dir: Path | None = None,
    stream: Any = None,
) -> SweepOutcome:
    """Run (or resume) the sweep ``path`` describes to its end; see the module docstring."""
    from ray import tune

    from lm.checkpoint import run_lock
    from lmplatform import sweep_report

    sweep = load_sweep(path, overrides, base_dir)
    Path(sweep.path).mkdir(parents=True, exist_ok=True)
    with run_lock(sweep.path):
        # The trials' progress lines (Train workers) would bury the live table: they stay in Ray's log files.
        tracking = sweep.pcfg.tracking
        ensure_ray(
            sweep.pcfg.ray, log_to_driver=False, tracking_uri=tracking.uri if tracking.enabled else None
        )
        resources = _trial_resources(sweep.pcfg)
        resuming = tune.Tuner.can_restore(sweep.path)
        parent = sweep_report.open_parent(sweep, resuming) if sweep.pcfg.tracking.enabled else None
        sweep = dataclasses.replace(sweep, parent_run_id=parent)
        try:
            _fit(sweep, resuming, resources, stream)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        trials = sweep_report.trials_table(sweep)
        interrupted = interrupted or any(t["status"] == "RUNNING" for t in trials)
        outcome = SweepOutcome(sweep, trials, None, parent, interrupted=interrupted)
        sweep_report.conclude(outcome)
    return outcome


def _fit(sweep: Sweep, resuming: bool, resources: dict[str, float], stream: Any) -> Any:
    """Tuner.fit() over a new Tuner, or the one restored from the sweep's directory (a re-run resumes)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), resources)
    if resuming:
        # Tune restores its own pickled run config, callbacks included (they print to stdout then).
        log.info("resuming sweep %s from %s (ASHA's rung records start empty)", sweep.name, sweep.path)
        tuner = tune.Tuner.restore(sweep.path, trainable, resume_errored=True)
    else:
        tc = sweep.pcfg.tune
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep.dims),
            tune_config=tune.TuneConfig(
                metric=tc.metric,
                mode="min",
                scheduler=_scheduler(sweep),
                num_samples=tc.num_samples,
                search_alg=_searcher(sweep),
                reuse_actors=False,
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(Path(sweep.path).parent),
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                callbacks=[SweepCallback(sweep, stream)],
                verbose=0,  # the callback's live table instead of Ray's
            ),
        )
    with _quiet_tune():
        return tuner.fit()


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = sweep.pcfg.tune
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    # max_t above every report: ASHA's stop_last_trials would otherwise end a trial at max_t, before its budget.
    return ASHAScheduler(
        time_attr=tc.time_attr, max_t=tc.max_t or 2**40, grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )  # fmt: skip


def _searcher(sweep: Sweep) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    seed = sweep.pcfg.tune.seed
    if seed is None:
        seed = int(sweep.base.get("train", {}).get("seed", 1337))
    # max_concurrent here: TuneConfig.max_concurrent_trials is ignored once a search_alg is given
    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.pcfg.tune.max_concurrent_trials)


def _trial_resources(pcfg: PlatformConfig) -> dict[str, float]:
    """CPUs (and in local mode GPUs) for a trial's actor: the loop's own in local mode, a sliver when Train
    workers hold them; fail fast when one trial cannot fit the cluster (Tune would wait forever)."""
    import ray

    rc = pcfg.ray
    trial_cpus = rc.cpus_per_worker if rc.num_workers == 0 else 0.01
    need = trial_cpus + rc.num_workers * rc.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise PlatformError(
            f"one trial needs {need:g} CPUs (ray.num_workers={rc.num_workers}, ray.cpus_per_worker="
            f"{rc.cpus_per_worker:g}, plus {trial_cpus:g} for the trial) but the Ray cluster has {have:g}: "
            "use ray.num_workers=0 (the loop runs in the trial) or lower ray.cpus_per_worker"
        )
    if pcfg.tune.max_concurrent_trials * need > have:
        log.warning(
            "tune.max_concurrent_trials=%d trials need %g CPUs, the cluster has %g: some will wait",
            pcfg.tune.max_concurrent_trials, pcfg.tune.max_concurrent_trials * need, have,
        )  # fmt: skip
    resources = {"cpu": trial_cpus}
    if rc.use_gpu and rc.num_workers == 0:  # local mode trains in the trial: Ray must hand it the GPU
        resources["gpu"] = rc.gpus_per_worker or 1.0
    return resources


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """No output from Tune itself: the live table and the summary say what happened (failures included).

    Tune's newer output engine prints its configuration box even with ``verbose=0``; the legacy engine
    (``RAY_AIR_NEW_OUTPUT=0``) at verbosity 0 prints nothing.
    """
    names = ("ray.tune", "ray.train", "ray.air")
    levels = {n: logging.getLogger(n).level for n in names}
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def sweep_command(path: str | Path, overrides: list[str]) -> int:
    """``lm sweep``: run or resume the sweep, print its outcome; exit 0 when some trial trained its budget."""
    from lmplatform.sweep_report import summary

    outcome = run_sweep(path, overrides)
    print(summary(outcome))
    if outcome.interrupted:
        return 130
    return 0 if any(t["status"] == "TERMINATED" for t in outcome.trials) else 1
