"""Ray Train around lm's loop: ``run_training(cfg, pcfg)`` launches a TorchTrainer whose workers call
:func:`lm.train.train` with a DistributedContext filled from Ray Train and hooks that stop and report.

One checkpoint tree per run:
- local storage (the default, ``runs/``): the workers' loop writes straight into the run directory
  ``<storage>/<run_name>``: ``step-NNNNNN`` (the last ``train.keep_last``), ``best/`` (lowest dev loss) and
  ``run.json``. Nothing is reported to Ray as a checkpoint, so Ray keeps no second copy; a restarted worker group
  (``ray.max_failures``) and a re-run of the same command resume from the loop's own latest step;
- remote storage (``s3://...``, ``file:///...``): the workers write into a local scratch directory and report
  every checkpoint, which Ray uploads to ``<storage>/<run_name>/checkpoint_*`` (the best ``ray.keep_checkpoints``
  by ``dev_loss`` plus the latest); resume goes through ``ray.train.get_checkpoint()``.

The driver holds ``run_lock`` on the directory the workers write into for the whole run (one writer), checks
that the run can start (``lm.train.preflight``: finished runs, shape or tokenizer changes) before the first MLflow
write, and turns SIGINT/SIGTERM into a stop request (:class:`StopRequest`) that every rank obeys at the same step
boundary, checkpointing there.

Testing aid: with ``LMLAB_FAIL_AT_STEP=N`` in the driver's environment, rank 0 raises at the first log step
>= N, once per run directory (a marker file remembers it), to exercise restarts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm.checkpoint import (
    METRICS,
    CheckpointManager,
    run_lock,
    safe_rmtree,
)
from lm.config import ExperimentConfig, build, to_dict
from lm.data import prepare_data
from lm.sharding import fsdp_wrapper
from lm.train import DistributedContext, Hooks, preflight, resolve_amp, resolve_device, train
from lmplatform import lean
from lmplatform.config import PlatformConfig, RayConfig
from lmplatform.prewarm import prestart_train_workers, take_worker_runtime_env
from lmplatform.tracking import MetricInbox, MetricLogger, MetricRelay, RunTracker, TrackingHooks, start_run

log = logging.getLogger("lmplatform.train")
FAIL_ENV = "LMLAB_FAIL_AT_STEP"
_FAIL_MARKER = ".lmlab-injected-failure"
_LOCK_FILE = ".lock"
_LOOP_CONFIG_REF = "lmlab_loop_config"  # where Train's workers find the loop config's object reference
# Ray Train 2.60's preemption watcher (it moves workers off nodes being drained) logs one spurious error line at
# every start (ray#53727). A cluster this process started is this one machine, which is never drained: there we
# switch the watcher off with Ray's own flag. A cluster we join keeps it.
_PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class PlatformError(RuntimeError):
    """Ray cannot be reached or a run cannot be launched as configured."""


@dataclass
class RayTrainOutcome:
    """What a Ray Train run produced, as the driver sees it."""

    result: Any  # ray.train.Result
    run_dir: str
    step: int
    metrics: dict[str, float]
    final_checkpoint: Path | None  # readable by the driver; weights + trainer state
    best_checkpoint: Path | None
    resumed_from_step: int | None  # the step rank 0 resumed from in its last attempt; None = fresh
    time_to_first_step: float | None  # seconds from the command's start to the first training step
    tracker: RunTracker | None
    interrupted: bool = False  # stopped early on request; final_checkpoint is where it stopped
    trained_steps: int = 0  # steps trained by this command (0: nothing new)
    device: str | None = None  # the device rank 0 trained on


# --------------------------------------------------------------------------------------------------------------
# Stop requests: the driver's SIGINT/SIGTERM, seen by every worker


_IN_PROCESS_STOP = threading.Event()  # Ray's local mode runs the loop in the driver: no key needed
_STOP_NAMESPACE = "lmlab-stop"  # the GCS key-value namespace of the driver-to-worker stop flags
_STOP_POLL_S = 0.25  # how often rank 0 reads the flag (one GCS round trip, about 0.5 ms, on a thread)


class StopRequest:
    """Driver side of a stop: :meth:`on_signals` turns SIGINT/SIGTERM into a request the workers obey.

    The signal handler only sets an Event (calling Ray from a signal handler could interrupt Ray itself holding
    a lock); a daemon thread forwards it to the workers' flag. A second signal gets Python's default behaviour,
    so a second Ctrl-C still aborts at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self._key: str | None = None
        self._handler: Any = None
        _IN_PROCESS_STOP.clear()

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.event.is_set()

    def request(self, name: str = "stop") -> None:
        """Ask the workers to stop at the next step boundary."""
        self.signal_name = self.signal_name or name
        self.event.set()
        _IN_PROCESS_STOP.set()

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[StopRequest]:
        """Install SIGINT/SIGTERM handlers for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def handler(signum: int, frame: Any) -> None:
            for s, h in previous.items():  # the next signal acts as it would have without us
                signal.signal(s, h)
            self._handler = None
            self.request(signal.Signals(signum).name)

        self._handler = handler
        self.rearm()
        try:
            yield self
        finally:
            self._handler = None
            for s, h in previous.items():
                signal.signal(s, h)

    def rearm(self) -> None:
        """Put our handlers back (ray.init installs Ray's own SIGTERM handler, which aborts the process)."""
        if self._handler is not None:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self._handler)

    def worker_handle(self) -> str:
        """The name of a flag the workers poll, a key in the GCS's key-value store, set once a stop is requested.

        A key rather than an actor: an actor is one more process, which took 1.7 s of CPU while the run started
        (it imports this module, hence torch) and, like every Ray actor, woke 100 times a second while it
        trained. The GCS lives on the head, so a worker node's death cannot take the flag with it. The store is
        ``ray.experimental.internal_kv``, which Ray's own libraries use for the same kind of small shared state.
        """
        from ray.experimental import internal_kv

        key = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._key = key

        def forward() -> None:
            self.event.wait()
            if self._key != key:  # released: the run is over
                return
            with contextlib.suppress(Exception):  # Ray already shut down: nobody left to tell
                internal_kv._internal_kv_put(key, b"1", namespace=_STOP_NAMESPACE)

        threading.Thread(target=forward, name="lmlab-stop-forward", daemon=True).start()
        return key

    def release(self) -> None:
        """Delete the flag :meth:`worker_handle` made (a long-lived cluster would otherwise keep one per run)."""
        key, self._key = self._key, None
        if key is not None:
            from ray.experimental import internal_kv

            with contextlib.suppress(Exception):  # Ray already shut down: the store went with it
                internal_kv._internal_kv_del(key, namespace=_STOP_NAMESPACE)


class _StopPoller:
    """Worker side, on rank 0 (all_max tells the rest): has the driver asked to stop?

    A daemon thread reads the flag every ``_STOP_POLL_S`` and the step only reads a bool, so a slow or paused GCS
    never holds up a training step (bench.ray_pause pauses it on purpose).
    """

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.stopped = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> bool:
        if self.key is None:
            self.stopped = self.stopped or _IN_PROCESS_STOP.is_set()
        elif self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="lmlab-stop-poll", daemon=True)
            self._thread.start()
        return self.stopped

    def close(self) -> None:
        """End the polling thread (the run is over)."""
        self._closed.set()

    def _poll(self) -> None:
        from ray.experimental import internal_kv

        while not self._closed.wait(_STOP_POLL_S):
            with contextlib.suppress(Exception):  # the next look may succeed; the driver's Ray may be gone
                if internal_kv._internal_kv_get(self.key, namespace=_STOP_NAMESPACE) is not None:
                    self.stopped = True
                    return


# --------------------------------------------------------------------------------------------------------------
# Driver


def ensure_ray(
    rc: RayConfig, log_to_driver: bool = True, tracking_uri: str | None = None, prestart: bool = False
) -> None:
    """Connect to ``ray.address`` / RAY_ADDRESS / a running local head, else start a quiet local Ray; then check
    the cluster can hold the worker group, since Ray Train otherwise waits for resources without a word, and
    (``tracking_uri``) that a cluster of several nodes tracks to a server, not to one node's file.
    ``prestart`` (one Train run, on a Ray this call starts): start its worker processes now (lmplatform.prewarm).
    ``log_to_driver=False`` (sweeps: a live table instead) leaves the workers' output in Ray's log files."""
    import ray

    started_here = False
    if not ray.is_initialized():
        where = rc.address or os.environ.get("RAY_ADDRESS")
        normal_worker_priority()  # matters only if this process starts the cluster
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            # Without a dashboard, Train's PlacementGroupCleaner warns every second that the state API is
            # unavailable; ERROR quiets Ray's own loggers (lm's progress lines are set up by the workers).
            "logging_config": ray.LoggingConfig(log_level="ERROR"),
            "log_to_driver": log_to_driver,
        }
        try:
            # Whether this process starts the cluster decides whether it can grow, and Ray has no public flag
            # for it. So ask in two steps, with ray.init's documented addresses: "auto" only joins a running local
            # head (ConnectionError when there is none), "local" always starts one.
            joined = False
            if where != "local":
                try:
                    ray.init(address=where or "auto", **options)
                    joined = True
                except ConnectionError:
                    if where:
                        raise
            if not joined:
                # without the head processes a one-machine Ray never uses (lmplatform.lean)
                with lean.bare_head() as extra:
                    ray.init(address="local", **options, **extra)
                started_here = True
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise PlatformError(f"cannot connect to Ray at {where or 'a running local head'}: {exc}") from exc
    own = started_here and prestart  # one run, on a Ray that ends with this process
    if started_here:
        os.environ.setdefault(_PREEMPTION_ENV, "0")
        if not (own and lean.enabled()):  # the lean trainer on lm's own Ray asks no coordinator (lean)
            start_train_coordinator()
    check_resources(rc, ray.cluster_resources(), fixed=started_here)
    from lmplatform.cluster import check_cluster  # imports this module

    check_cluster(rc, tracking_uri, [n for n in ray.nodes() if n.get("Alive")], fixed=started_here)
    # 0 workers: nothing prestarted, and nothing an earlier run in this process prestarted is handed to this one
    prestart_train_workers(rc.num_workers if own else 0)
    # a single run on a Ray it started: Ray ends with this process, so Train's placement-group cleaner has no work
    lean.claim_cluster(own)


def start_train_coordinator() -> bool:
    """Start Ray Train's autoscaling coordinator now, from the driver; False where this Ray has none.

    Train's controller creates this detached actor itself (``get_or_create``, by name) and waits for its first
    answer before it asks for the workers: a new process plus ray.data's imports, on the way to the first step.
    Created here, right after ``ray.init``, it starts in a prestarted worker while the MLflow run opens, and the
    controller finds it. On 2 cores that moved the first step of ``lm train experiments/tiny.yaml
    train.max_seconds=3`` from 15.6-15.9 s to 14.2-14.6 s (alternating runs, as printed then, without the imports).
    The module is Ray's own, not public API: where a Ray release moves it, this does nothing and Train creates the
    actor as before. A single run on a Ray ``ensure_ray`` started for it needs no coordinator at all
    (``lean.without_coordinator``), so this is for sweeps and ``LMLAB_LEAN=0``.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return False
    get_or_create_autoscaling_coordinator()
    return True


def normal_worker_priority() -> None:
    """Let a Ray started by this process run its workers at this process's priority (unless the user set
    RAY_worker_niceness). Ray's default, nice 15, gives a training worker, a trial or a Serve replica the CPU only
    when nothing else on the machine wants it: on a shared 2-core machine a 120-s trial made 140-700 steps."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def probe_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail at once when ``address`` (``host:port`` or ``ray://host:port``) takes no connection.

    ``ray.init`` would retry an unreachable GCS for minutes, printing only Ray's own warnings. ``auto``,
    ``local`` and no address at all are left to ``ray.init`` (they start or find a local head).
    """
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: let ray.init say what it thinks of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PlatformError(
            f"cannot reach Ray at {address} ({exc.strerror or exc}): start a head there (`ray start --head`), "
            "fix ray.address / RAY_ADDRESS, or unset it to start a local Ray"
        ) from exc


def check_resources(rc: RayConfig, total: dict[str, float], fixed: bool) -> None:
    """Fail (fixed-size cluster) or warn (one that may autoscale) when the worker group cannot be placed."""
    need = {"CPU": rc.num_workers * rc.cpus_per_worker}
    if rc.use_gpu:
        need["GPU"] = rc.num_workers * (rc.gpus_per_worker or 1.0)
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if not short:
        return
    have = ", ".join(f"{total.get(k, 0.0):g} {k}" for k in need)
    message = (
        f"ray.num_workers={rc.num_workers} needs {', '.join(f'{v:g} {k}' for k, v in need.items())} "
        f"(ray.cpus_per_worker={rc.cpus_per_worker:g}"
        + (f", ray.gpus_per_worker={rc.gpus_per_worker or 1:g}" if rc.use_gpu else "")
        + f") but the Ray cluster has {have}"
    )
    if fixed:
        raise PlatformError(f"{message}; lower ray.num_workers or the per-worker resources")
    log.warning("%s; Ray Train will wait until the cluster grows", message)


def worker_dir(rc: RayConfig) -> Path:
    """Where the workers' loop writes: the run directory itself on local storage, else local scratch space."""
    if rc.is_local_storage:
        return Path(rc.run_dir)
    # Remote storage: workers keep their working checkpoints on local disk; Ray uploads what they report.
    return Path(tempfile.gettempdir()) / "lmlab" / str(rc.run_name)


def run_training(
    cfg: ExperimentConfig,
    pcfg: PlatformConfig,
    *,
    restart: bool = False,
    started_at: float | None = None,
    stop: StopRequest | None = None,
    mlflow_run_id: str | None = None,
    report: Any = None,
) -> RayTrainOutcome:
    """Train ``cfg`` on Ray Train as ``pcfg.ray`` says, tracked in MLflow unless ``tracking.enabled`` is false.

    ``restart`` deletes everything of the previous run first; otherwise a run with checkpoints is continued, and
    a finished one is refused (``lm.train.RunFinishedError``) before anything is written. ``stop`` (set from the
    driver's signal handlers) makes the workers stop at the next step boundary and checkpoint there.
    A sweep's trial (lmplatform.tune) passes ``mlflow_run_id``, its child run found by its trial tag, which is
    reopened whatever run.json records, and ``report``, called as ``report(step, dev_metrics)`` on rank 0 after
    every dev evaluation (it forwards them to Ray Tune).
    """
    started_at = started_at if started_at is not None else time.time()
    stop = stop or StopRequest()
    from lmplatform.cluster import local_tracking_node

    rc = pcfg.ray
    root = worker_dir(rc)
    with run_lock(root):
        if restart:
            _delete_run(rc, root)
        # Once, here, so workers hit the token cache instead of racing to build it.
        data = prepare_data(cfg, progress=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(root)))
        # Everything that can refuse this run, before the first MLflow write (a refused command changes nothing).
        # The MLflow run is reopened only when a checkpoint is resumed: a launch that failed before its first
        # checkpoint (no CPUs, a bad device) must not lend its params to the retry that trains.
        if rc.is_local_storage or restart:
            resumes = preflight(cfg, root, resume=not restart, data=data) is not None
        else:
            with _latest_remote_checkpoint(rc) as latest:
                resumes = latest is not None
                if latest is not None:
                    preflight(cfg, root, resume=latest, data=data)
        _raise_if_stopped(stop)
        tracker = _start_ray_and_tracking(cfg, pcfg, resumes, data.tokenizer_path, root, mlflow_run_id)
        stop.rearm()
        with tracker.track() if tracker is not None else contextlib.nullcontext():
            _raise_if_stopped(stop)
            # Ray's workers send rank 0's metrics here, and this process logs them (tracking.MetricRelay). Not in
            # a sweep's trial: its scheduler can end this process before the last batch is read, so rank 0 logs
            # them itself there.
            relayed = tracker is not None and rc.num_workers > 0 and report is None
            inbox = MetricInbox(tracker) if relayed else None
            logs_itself = rc.num_workers > 0 and not relayed  # rank 0 on Ray opens the store
            loop_config = {
                "experiment": to_dict(cfg),
                "report_checkpoints": not rc.is_local_storage,
                "fail_marker": str(root / _FAIL_MARKER),
                "fail_at_step": _fail_at_step(),
                "cpus_per_worker": rc.cpus_per_worker,
                "local_mode": rc.num_workers == 0,
                "strategy": rc.strategy,
                "logger": inbox.relay() if inbox else tracker.logger if tracker else None,
                "record_dir": str(root) if rc.is_local_storage else None,
                "started_at": started_at,
                "stop": None if rc.num_workers == 0 else stop.worker_handle(),  # released below
                "report": report,
                # a local MLflow store is only this node's: a rank 0 that logs must run here (autoscaled clusters)
                "tracking_node": local_tracking_node(pcfg.tracking) if logs_itself else None,
            }
            try:
                result = _fit(build_trainer(rc, loop_config), inbox.drain if inbox else None)
            except Exception as exc:  # the worker's own error, not Ray's wrapper, says why
                if tracker is not None and stop.requested:
                    # A stop (a sweep's scheduler) tore the run down; whoever stopped it says why in the note.
                    tracker.end("KILLED")
                elif tracker is not None:
                    tracker.fail(failure_reason(exc))
                raise
            finally:
                stop.release()
                if inbox is not None:
                    inbox.close()  # all of rank 0's metrics, before anything reads them back (or the run ends)
            outcome = _outcome(result, rc, root, tracker)
            if tracker is not None:
                tracker.conclude(
                    cfg, interrupted=outcome.interrupted, final=outcome.final_checkpoint,
                    best=outcome.best_checkpoint, trained_steps=outcome.trained_steps,
                    register=pcfg.tracking.register_model, device=outcome.device,  # what the worker really used
                )  # fmt: skip
    return outcome


def failure_reason(exc: BaseException) -> str:
    """One line saying why a run failed: the first worker's (or Ray's controller's) error, else ``exc`` itself."""
    causes = sorted(getattr(exc, "worker_failures", {}).items(), key=lambda item: item[0])
    if causes:
        rank, cause = causes[0]
        lines = str(cause).strip().splitlines()
        return f"rank {rank}: {lines[-1] if lines else type(cause).__name__}"
    cause = getattr(exc, "controller_failure", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def _raise_if_stopped(stop: StopRequest) -> None:
    if stop.requested:  # before any worker started: nothing to checkpoint
        raise KeyboardInterrupt(stop.signal_name)


def _delete_run(rc: RayConfig, root: Path) -> None:
    """--restart: remove everything of the previous run (not the lock we hold), only inside the storage root."""
    if rc.is_local_storage:
        storage = Path(rc.storage_path)
    else:
        storage = root.parent
        _delete_remote_run(rc)
    if not root.is_dir():
        return
    log.info("--restart: removing the previous run in %s", root)
    for child in root.iterdir():
        if child.name == _LOCK_FILE:
            continue
        safe_rmtree(child, storage)


def _delete_remote_run(rc: RayConfig) -> None:
    """Delete ``<storage>/<run_name>`` on remote storage, through pyarrow's filesystem for that URI."""
    import pyarrow.fs

    fs, storage = pyarrow.fs.FileSystem.from_uri(rc.storage_path)
    run = f"{storage.rstrip('/')}/{rc.run_name}"
    # run_name is validated (no '/', not '.' or '..'), so this is one level strictly inside the storage root.
    if not rc.run_name or "/" in rc.run_name or rc.run_name in (".", "..") or not storage.strip("/"):
        raise PlatformError(f"refusing to delete {rc.run_dir}: not strictly inside {rc.storage_path}")
    if fs.get_file_info(run).type != pyarrow.fs.FileType.NotFound:
        log.info("--restart: removing the previous run in %s", rc.run_dir)
        fs.delete_dir(run)


@contextlib.contextmanager
def _latest_remote_checkpoint(rc: RayConfig) -> Iterator[Path | None]:
    """A local copy of the newest ``checkpoint_*`` Ray keeps for this run on remote storage (None: none), so the
    driver can refuse a finished or incompatible run before it writes to MLflow. Ray names checkpoint folders
    by report time (``checkpoint_YYYY-MM-DD_HH-MM-SS.ffffff``), so the last name is the latest."""
    import pyarrow.fs

    fs, storage = pyarrow.fs.FileSystem.from_uri(rc.storage_path)
    run = f"{storage.rstrip('/')}/{rc.run_name}"
    found = [
        info.path
        for info in fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    ]
    if not found:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="lmlab-preflight-") as tmp:
        local = Path(tmp) / "latest"
        local.mkdir()
        pyarrow.fs.copy_files(max(found), str(local), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
        yield local


def _fit(trainer: Any, while_waiting: Callable[[], Any] | None = None) -> Any:
    """``trainer.fit()`` on a helper thread while the main thread waits, calling ``while_waiting`` every second.

    On the main thread Ray Train's ``fit()`` installs its own SIGINT handler, which aborts the run: no checkpoint,
    exit 1. Off the main thread it leaves signals alone, so our handler (a checkpoint at the next step boundary,
    exit 130) stays in charge; the main thread wakes every 0.2 s, so the handler runs promptly.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="lmlab-fit", daemon=True)
    thread.start()
    waited = 0
    while thread.is_alive():
        thread.join(0.2)
        waited += 1
        if while_waiting is not None and waited % 5 == 0:
            while_waiting()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_trainer(rc: RayConfig, loop_config: dict[str, Any]) -> Any:
    """The TorchTrainer for :func:`_train_loop_per_worker` with scaling, storage, checkpoints and restarts."""
    import ray.train

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    env = take_worker_runtime_env()  # the processes lmplatform.prewarm prestarted were given this one
    prestarted = {"worker_runtime_env": env} if env is not None else {}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker or 1.0
    # Without the Train parts lm never uses (lmplatform.lean): fewer processes taking the worker's cores.
    trainer_class = lean.trainer_class(own_cluster=lean.take_own_cluster())
    if rc.num_workers > 0:
        # Train's controller unpickles the loop config; a reference to it in Ray's object store spares the
        # controller's start the imports of lm and torch (the logger's classes), 1.5-2 s on the way to the first step
        loop_config = {_LOOP_CONFIG_REF: ray.put(loop_config)}
    return trainer_class(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=lean.torch_config(rc.strategy, rc.num_workers),
        scaling_config=ray.train.ScalingConfig(
            num_workers=rc.num_workers,
            use_gpu=rc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=rc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=rc.run_name,
            storage_path=rc.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=rc.keep_checkpoints,
                checkpoint_score_attribute="dev_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=rc.max_failures),
            # Train's per-report INFO lines drown lm's progress lines; warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            **prestarted,
        ),
    )


def _start_ray_and_tracking(
    cfg: ExperimentConfig,
    pcfg: PlatformConfig,
    resume: bool,
    tokenizer: Path,
    root: Path,
    mlflow_run_id: str | None = None,
) -> RunTracker | None:
    """Open the MLflow run while Ray starts (each takes seconds); a run whose Ray never came up ends FAILED."""
    rc = pcfg.ray
    if rc.num_workers > 0:
        probe_ray_address(
            rc.address or os.environ.get("RAY_ADDRESS")
        )  # a wrong address: no MLflow run at all
    # Ray must start on the main thread (ray.init from a worker thread lost its GCS connection here), so the
    # MLflow side (import, schema check, params) is the part that moves to a thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-start") as pool:
        opening = pool.submit(
            start_run, cfg, pcfg, rc.run_dir, launcher="ray", resume=resume, tokenizer_path=tokenizer,
            record_dir=root, run_id=mlflow_run_id,
        )  # fmt: skip
        try:
            if rc.num_workers > 0:  # local mode runs in this process and needs no cluster (saves seconds)
                ensure_ray(
                    rc, tracking_uri=pcfg.tracking.uri if pcfg.tracking.enabled else None, prestart=True
                )
        except BaseException as exc:
            tracker = opening.result()
            if tracker is not None:
                if isinstance(exc, KeyboardInterrupt):
                    tracker.end("KILLED", "interrupted while Ray started")
                else:
                    tracker.fail(f"Ray: {failure_reason(exc)}")
            raise
        return opening.result()


def _outcome(result: Any, rc: RayConfig, root: Path, tracker: RunTracker | None) -> RayTrainOutcome:
    summary = result.return_value or {}
    metrics = dict(summary.get("metrics") or result.metrics or {})
    if rc.is_local_storage:  # the loop's own tree is the run's tree
        final = Path(summary["last_checkpoint"]) if summary.get("last_checkpoint") else None
        best_dir = root / "best"
        best = best_dir if best_dir.is_dir() else None
    else:
        final = _local_dir(result.checkpoint, "final") if result.checkpoint is not None else None
        best = (
            _local_dir(result.get_best_checkpoint("dev_loss", "min"), "best")
            if result.best_checkpoints
            else None
        )
    return RayTrainOutcome(
        result=result,
        run_dir=rc.run_dir,
        step=int(summary.get("step", metrics.get("step", 0))),
        metrics=metrics,
        final_checkpoint=final,
        best_checkpoint=best,
        resumed_from_step=summary.get("resumed_from_step"),
        time_to_first_step=summary.get("time_to_first_step"),
        tracker=tracker,
        interrupted=bool(summary.get("interrupted")),
        trained_steps=int(summary.get("trained_steps", 0)),
        device=summary.get("device"),
    )


def _local_dir(checkpoint: Any, name: str) -> Path:
    """A directory the driver can read: the checkpoint itself on a local filesystem, else a downloaded copy."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix=f"lmlab-{name}-")))


def _fail_at_step() -> int | None:
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise PlatformError(f"{FAIL_ENV}={value!r} must be an integer step") from exc


# --------------------------------------------------------------------------------------------------------------
# Workers


def ray_distributed_context(
    strategy: str = "ddp", amp: str = "off", own_checkpoint_root: Path | None = None
) -> DistributedContext:
    """lm's DistributedContext for this Ray Train worker: rank, world size, device, the DDP or FSDP wrapper,
    all_max.

    ``fsdp`` shards the model over every worker of the group (one worker included: the same code path), with bf16
    parameters when ``amp`` (train.amp) resolves to bf16 on this device. ``own_checkpoint_root``: ranks other than
    0 write their checkpoint shards under ``<root>/rank-NNNNN`` and report them, for Ray to merge (remote storage;
    rank 0's part is the checkpoint directory itself).
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world_size, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    own = own_checkpoint_root / f"rank-{rank:05d}" if own_checkpoint_root is not None else None
    if strategy == "fsdp":
        # FSDP2's fully_shard over a mesh of the Ray Train workers (gloo on CPU, nccl on GPU: the group Ray set
        # up); not prepare_model(parallel_strategy="fsdp"), which wraps the older FSDP and needs CUDA.
        return DistributedContext(
            rank=rank, world_size=world_size, device=device, wrap_model=fsdp_wrapper(device, resolve_amp(amp, device)),
            all_max=_all_max_over(device) if world_size > 1 else DistributedContext.all_max,
            own_checkpoint_dir=own,
        )  # fmt: skip
    if world_size == 1:
        return DistributedContext(rank=rank, world_size=1, device=device)

    # prepare_model moves the model to the worker's device and wraps it in DDP (gloo on CPU, nccl on GPU).
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        device=device,
        wrap_model=ray.train.torch.prepare_model,
        all_max=_all_max_over(device),
    )


def _all_max_over(device: torch.device) -> Any:
    def all_max(values: list[float]) -> list[float]:
        # Ranks must agree on elapsed time and on stopping, or they stop at different steps and the last
        # all-reduce deadlocks. gloo reduces on CPU tensors; nccl needs them on the GPU.
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.tolist()

    return all_max


class RayHooks(Hooks):
    """Stops on the driver's request, reports checkpoints to Ray (remote storage), forwards metrics to MLflow
    (rank 0) and injects test failures."""

    def __init__(
        self,
        rank: int,
        tracking: Hooks | None = None,
        fail_at_step: int | None = None,
        fail_marker: Path | None = None,
        started_at: float | None = None,
        report_checkpoints: bool = False,
        stop: _StopPoller | None = None,
        report: Any = None,
    ) -> None:
        self.rank = rank
        self.report = report  # a sweep trial's reporter (rank 0 only): dev metrics to Ray Tune
        self.tracking = tracking
        self.fail_at_step = fail_at_step
        self.fail_marker = fail_marker
        self.started_at = started_at
        self.report_checkpoints = report_checkpoints
        self.stop = stop
        self.resumed_from_step: int | None = None
        self.time_to_first_step: float | None = None

    def on_start(self) -> None:
        """Let the tracking hooks finish their set-up before the training clock starts."""
        if self.tracking is not None:
            self.tracking.on_start()

    def should_stop(self) -> bool:
        """True once the driver asked to stop (rank 0 looks; the loop's all_max tells the other ranks)."""
        if self.time_to_first_step is None and self.started_at is not None:
            self.time_to_first_step = time.time() - self.started_at
            if self.rank == 0:
                log.debug("first training step %.1fs after the command started", self.time_to_first_step)
        return self.rank == 0 and self.stop is not None and self.stop()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Maybe inject the test failure, then send the training metrics to MLflow."""
        self._maybe_fail(step)
        if self.tracking is not None:
            self.tracking.on_log(step, metrics)
        if self.report is not None and self.rank == 0:
            self.report.observe(metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Send dev (and, at the end, val) metrics to MLflow, and to Ray Tune in a sweep."""
        if self.tracking is not None:
            self.tracking.on_eval(step, metrics)
        if self.report is not None and self.rank == 0:
            self.report(step, metrics)

    def on_checkpoint(self, step: int, metrics: dict[str, float], path: Path | None) -> None:
        """Remote storage: report on every rank (Ray waits for all); rank 0 hands over the directory, and under
        fsdp every other rank its own part (its shards), which Ray merges into the same checkpoint."""
        if not self.report_checkpoints:
            return
        import ray.train

        extra = {"resumed_from_step": float(self.resumed_from_step or 0)}
        if self.time_to_first_step is not None:
            extra["time_to_first_step_s"] = self.time_to_first_step
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({**metrics, **extra}, checkpoint=checkpoint)

    def _maybe_fail(self, step: int) -> None:
        if (
            self.fail_at_step is None
            or self.fail_marker is None
            or self.rank != 0
            or step < self.fail_at_step
        ):
            return
        if self.fail_marker.exists():  # only the first attempt fails, so the restarted group can finish
            return
        self.fail_marker.parent.mkdir(parents=True, exist_ok=True)
        self.fail_marker.write_text(str(step))
        raise RuntimeError(f"{FAIL_ENV}={self.fail_at_step}: injected failure at step {step} (testing aid)")


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker (or in the driver in local mode): rebuild the config, resume, train."""
    import ray.train

    if _LOOP_CONFIG_REF in config:  # (build_trainer)
        config = ray.get(config[_LOOP_CONFIG_REF])
    # A worker gets the CPUs Ray reserved for it; in local mode the loop runs in the driver and keeps its threads.
    if not config["local_mode"]:
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    cfg = build(ExperimentConfig, config["experiment"])
    if config["local_mode"]:
        # One process on the device train.device names; Ray's context API refuses to run inside a Ray Tune trial
        # (a sweep's local-mode trials: ray#49454), and has nothing to add to rank 0 of 1.
        dist = DistributedContext(device=resolve_device(cfg.train.device))
    else:
        own_root = Path(cfg.train.out_dir) if config["report_checkpoints"] else None
        dist = ray_distributed_context(config.get("strategy", "ddp"), cfg.train.amp, own_root)
    _worker_logging(config["local_mode"], dist.rank)
    logger: MetricLogger | MetricRelay | None = config["logger"] if dist.is_main else None
    if logger is not None:
        from lmplatform.cluster import check_tracking_node

        check_tracking_node(config.get("tracking_node"), logger.uri)
        logger.warm_up()
    stop = _StopPoller(config["stop"])
    hooks = RayHooks(
        rank=dist.rank,
        tracking=TrackingHooks(logger, config["record_dir"]) if logger is not None else None,
        fail_at_step=config["fail_at_step"],
        fail_marker=Path(config["fail_marker"]),
        started_at=config["started_at"],
        report_checkpoints=config["report_checkpoints"],
        stop=stop,
        report=config.get("report"),
    )
    # The driver holds the run lock and handles the signals for the whole run.
    options: dict[str, Any] = {"hooks": hooks, "dist": dist, "lock": False, "handle_signals": False}
    checkpoint = ray.train.get_checkpoint() if config["report_checkpoints"] else None
    try:
        if checkpoint is None:
            # Local storage: the loop's own latest step in the run directory. Remote storage with nothing in
            # Ray: scratch files here belong to a run Ray no longer knows (e.g. after --restart): start clean.
            resume = not config["report_checkpoints"]
            latest = CheckpointManager(cfg.train.out_dir).latest() if resume else None
            hooks.resumed_from_step = _checkpoint_step(latest) if latest is not None else None
            result = train(cfg, resume=resume, **options)
        else:
            # train() reads the checkpoint before its first step, so it is safe to use inside the context
            with checkpoint.as_directory() as directory:
                hooks.resumed_from_step = _checkpoint_step(Path(directory))
                result = train(cfg, resume=Path(directory), **options)
    finally:
        stop.close()
        if logger is not None:
            logger.close()  # every metric on its way to the driver before Train reports the run done
    return {
        "step": result.step,
        "metrics": result.metrics,
        "interrupted": result.interrupted,
        "trained_steps": result.trained_steps,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "device": str(dist.device) if dist.device is not None else None,
        "resumed_from_step": hooks.resumed_from_step,
        "time_to_first_step": hooks.time_to_first_step,
    }


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / METRICS).read_text())["step"])
    except (OSError, KeyError, ValueError):
        return None


def _worker_logging(local_mode: bool, rank: int) -> None:
    """lm's INFO lines once each (rank 0 only: other ranks say the same), with a time stamp; Ray Train's
    per-report INFO lines dropped."""
    if local_mode:  # Train's logging setup (and its level filter) is not applied in the driver
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        return
    # Ray 2.60 logs "Reporting training result N: <every metric>" through a logger named after its source
    # *file*, which Train's own log-level filter misses; silence just that one.
    with contextlib.suppress(Exception):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    for name in ("lm", "lmplatform"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        if not any(getattr(h, "_lmlab", False) for h in logger.handlers):
            # One handler of our own, in lm's format, and no propagation: the worker's root logger (set up by
            # Ray Train) would print each line a second time, without a time stamp.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
            handler._lmlab = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
    # The driver prepared the data and said so; the worker only reopens the cache (its lines would repeat them).
    logging.getLogger("lm.data").setLevel(logging.WARNING)
