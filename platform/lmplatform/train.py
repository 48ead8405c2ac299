"""Ray Train around lm's loop: ``run_training(cfg, pcfg)`` launches a TorchTrainer whose workers call
:func:`lm.train.train` with a DistributedContext filled from Ray Train and hooks that report checkpoints.

Where things live:
- the token cache is built once by the driver before any worker starts; workers find it by absolute path;
- each worker trains into ``<storage>/<run>/worker-ckpts`` (only rank 0 writes), and every checkpoint it saves
  is reported to Ray, which copies it to ``<storage>/<run>/checkpoint_*`` and keeps the best ``keep_checkpoints``
  by val_loss (plus the latest);
- a restarted worker group (``ray.max_failures``) or a re-run of the same command with the same run name
  resumes from Ray's latest checkpoint (``ray.train.get_checkpoint()``), so the step counter continues; Ray's
  local mode (``ray.num_workers=0``) persists nothing, so there a re-run resumes from the loop's own checkpoints;
- per-step metrics go to MLflow from rank 0 directly: Ray Train V2 does not keep metrics reported without a
  checkpoint, and routing them through ``ray.train.report`` would make every log step a barrier for all ranks.

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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm.checkpoint import METRICS, CheckpointManager
from lm.config import ExperimentConfig, build, to_dict
from lm.data import prepare_data
from lm.train import DistributedContext, Hooks, train
from lmplatform.config import PlatformConfig, RayConfig
from lmplatform.tracking import MetricLogger, RunTracker, TrackingHooks, start_run

log = logging.getLogger("lmplatform.train")
FAIL_ENV = "LMLAB_FAIL_AT_STEP"
WORKER_DIR = "worker-ckpts"
_FAIL_MARKER = ".lmlab-injected-failure"


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


# --------------------------------------------------------------------------------------------------------------
# Driver


def ensure_ray(rc: RayConfig) -> None:
    """Connect to ``ray.address`` / RAY_ADDRESS / a running local head, else start a quiet local Ray; then check
    the cluster can hold the worker group, since Ray Train otherwise waits for resources without a word."""
    import ray

    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=rc.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                # Without a dashboard, Train's PlacementGroupCleaner warns every second that the state API is
                # unavailable; ERROR quiets Ray's own loggers (Train sets its workers' root logger to INFO
                # itself, so lm's progress lines still show).
                logging_config=ray.LoggingConfig(log_level="ERROR"),
            )
        except (ConnectionError, ValueError) as exc:
            where = rc.address or os.environ.get("RAY_ADDRESS") or "a running local head"
            raise PlatformError(f"cannot connect to Ray at {where}: {exc}") from exc
        # A cluster this process started has a fixed size; one it joined may autoscale. Ray has no public
        # flag for this; its driver-side Node object is a head only when ray.init started the cluster.
        from ray._private import worker as ray_worker

        started_here = bool(getattr(getattr(ray_worker, "_global_node", None), "head", False))
    check_resources(rc, ray.cluster_resources(), fixed=started_here)


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


def run_training(
    cfg: ExperimentConfig,
    pcfg: PlatformConfig,
    *,
    restart: bool = False,
    started_at: float | None = None,
) -> RayTrainOutcome:
    """Train ``cfg`` on Ray Train as ``pcfg.ray`` says, tracked in MLflow unless ``tracking.enabled`` is false.

    ``restart`` deletes the run directory first; otherwise a run directory with checkpoints is continued.
    """
    started_at = started_at if started_at is not None else time.time()
    rc = pcfg.ray
    if restart and rc.is_local_storage and Path(rc.run_dir).exists():
        log.info("--restart: removing %s", rc.run_dir)
        shutil.rmtree(rc.run_dir)
    # Once, here, so workers hit the token cache instead of racing to build it.
    data = prepare_data(cfg, progress=True)
    worker_root = _worker_root(rc)
    # The loop's out_dir becomes the worker-local directory; logging the config with it says where files went.
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, out_dir=str(worker_root / WORKER_DIR))
    )
    tracker = _start_ray_and_tracking(cfg, pcfg, restart, data.tokenizer_path)
    with tracker.track() if tracker else contextlib.nullcontext():
        loop_config = {
            "experiment": to_dict(cfg),
            "fail_marker": str(worker_root / _FAIL_MARKER),
            "fail_at_step": _fail_at_step(),
            "cpus_per_worker": rc.cpus_per_worker,
            "local_mode": rc.num_workers == 0,
            "logger": tracker.logger if tracker else None,
            "started_at": started_at,
        }
        result = build_trainer(rc, loop_config).fit()
        outcome = _outcome(result, rc, worker_root, tracker)
        if tracker is not None:
            tracker.finish(
                cfg, outcome.final_checkpoint, outcome.best_checkpoint, pcfg.tracking.register_model
            )
    return outcome


def build_trainer(rc: RayConfig, loop_config: dict[str, Any]) -> Any:
    """The TorchTrainer for :func:`_train_loop_per_worker` with scaling, storage, checkpoints and restarts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker or 1.0
    return TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=rc.run_name,
            storage_path=rc.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=rc.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=rc.max_failures),
            # Train's per-report INFO lines drown lm's progress lines; warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _start_ray_and_tracking(
    cfg: ExperimentConfig, pcfg: PlatformConfig, restart: bool, tokenizer: Path
) -> RunTracker | None:
    """Open the MLflow run while Ray starts (each takes seconds); a run whose Ray never came up ends FAILED."""
    rc = pcfg.ray
    # Ray must start on the main thread (ray.init from a worker thread lost its GCS connection here), so the
    # MLflow side (import, schema check, params) is the part that moves to a thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-start") as pool:
        opening = pool.submit(
            start_run, cfg, pcfg, rc.run_dir, launcher="ray", resume=not restart, tokenizer_path=tokenizer
        )
        try:
            if rc.num_workers > 0:  # local mode runs in this process and needs no cluster (saves seconds)
                ensure_ray(rc)
        except BaseException:
            tracker = opening.result()
            if tracker is not None:
                tracker.client.set_terminated(tracker.run_id, status="FAILED")
            raise
        return opening.result()


def _outcome(result: Any, rc: RayConfig, worker_root: Path, tracker: RunTracker | None) -> RayTrainOutcome:
    summary = result.return_value or {}
    metrics = dict(result.metrics or summary.get("metrics") or {})
    final = _local_dir(result.checkpoint, "final") if result.checkpoint is not None else None
    best = None
    if result.best_checkpoints:
        best = _local_dir(result.get_best_checkpoint("val_loss", "min"), "best")
    elif (worker_root / WORKER_DIR / "best").is_dir():  # local mode keeps no checkpoint history
        best = worker_root / WORKER_DIR / "best"
    return RayTrainOutcome(
        result=result,
        run_dir=rc.run_dir,
        step=int(metrics.get("step", summary.get("step", 0))),
        metrics=metrics,
        final_checkpoint=final,
        best_checkpoint=best,
        resumed_from_step=summary.get("resumed_from_step"),
        time_to_first_step=summary.get("time_to_first_step"),
        tracker=tracker,
    )


def _local_dir(checkpoint: Any, name: str) -> Path:
    """A directory the driver can read: the checkpoint itself on local storage, else a downloaded copy."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix=f"lmlab-{name}-")))


def _worker_root(rc: RayConfig) -> Path:
    if rc.is_local_storage:
        return Path(rc.run_dir)
    # Remote storage: workers keep their working checkpoints on local disk; Ray uploads what they report.
    return Path(tempfile.gettempdir()) / "lmlab" / str(rc.run_name)


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


def ray_distributed_context() -> DistributedContext:
    """lm's DistributedContext for this Ray Train worker: rank, world size, device, DDP wrapper, broadcast."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world_size, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if world_size == 1:
        return DistributedContext(rank=rank, world_size=1, device=device)

    def broadcast(value: float) -> float:
        # Every rank must agree on elapsed time, or ranks with a max_seconds budget stop at different steps
        # and the last all-reduce deadlocks.
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())

    # prepare_model moves the model to the worker's device and wraps it in DDP (gloo on CPU, nccl on GPU).
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        device=device,
        wrap_model=ray.train.torch.prepare_model,
        broadcast=broadcast,
    )


class RayHooks(Hooks):
    """Reports every checkpoint to Ray Train (all ranks), forwards metrics to MLflow (rank 0), injects failures."""

    def __init__(
        self,
        rank: int,
        tracking: Hooks | None = None,
        fail_at_step: int | None = None,
        fail_marker: Path | None = None,
        started_at: float | None = None,
    ) -> None:
        self.rank = rank
        self.tracking = tracking
        self.fail_at_step = fail_at_step
        self.fail_marker = fail_marker
        self.started_at = started_at
        self.resumed_from_step: int | None = None
        self.time_to_first_step: float | None = None

    def on_start(self) -> None:
        """Let the tracking hooks finish their set-up before the training clock starts."""
        if self.tracking is not None:
            self.tracking.on_start()

    def should_stop(self) -> bool:
        """Never stops early; its first call marks the start of the first training step."""
        if self.time_to_first_step is None and self.started_at is not None:
            self.time_to_first_step = time.time() - self.started_at
            if self.rank == 0:
                log.info("first training step %.1fs after the command started", self.time_to_first_step)
        return False

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Maybe inject the test failure, then send the training metrics to MLflow."""
        self._maybe_fail(step)
        if self.tracking is not None:
            self.tracking.on_log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Send validation metrics to MLflow."""
        if self.tracking is not None:
            self.tracking.on_eval(step, metrics)

    def on_checkpoint(self, step: int, metrics: dict[str, float], path: Path | None) -> None:
        """Report on every rank (Ray waits for all); rank 0 hands over the checkpoint directory."""
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

    _worker_logging(config["local_mode"])
    # A worker gets the CPUs Ray reserved for it; in local mode the loop runs in the driver and keeps its threads.
    if not config["local_mode"]:
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    cfg = build(ExperimentConfig, config["experiment"])
    dist = ray_distributed_context()
    logger: MetricLogger | None = config["logger"] if dist.is_main else None
    if logger is not None:
        logger.warm_up()
    hooks = RayHooks(
        rank=dist.rank,
        tracking=TrackingHooks(logger) if logger is not None else None,
        fail_at_step=config["fail_at_step"],
        fail_marker=Path(config["fail_marker"]),
        started_at=config["started_at"],
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Local mode persists nothing in Ray, so its own checkpoints are the resume point. With workers, files
        # here belong to a run Ray no longer knows (e.g. after --restart): start clean.
        latest = CheckpointManager(cfg.train.out_dir).latest() if config["local_mode"] else None
        if latest is None and dist.is_main:
            shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
        hooks.resumed_from_step = _checkpoint_step(latest) if latest is not None else None
        result = train(cfg, hooks=hooks, dist=dist, resume=latest or False)
    else:
        # train() reads the checkpoint before its first step, so it is safe to use inside the context
        with checkpoint.as_directory() as directory:
            hooks.resumed_from_step = _checkpoint_step(Path(directory))
            result = train(cfg, hooks=hooks, dist=dist, resume=Path(directory))
    return {
        "step": result.step,
        "metrics": result.metrics,
        "resumed_from_step": hooks.resumed_from_step,
        "time_to_first_step": hooks.time_to_first_step,
    }


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / METRICS).read_text())["step"])
    except (OSError, KeyError, ValueError):
        return None


def _worker_logging(local_mode: bool) -> None:
    """Keep lm's INFO progress lines and drop Ray Train's per-report INFO lines."""
    if local_mode:  # Train's logging setup (and its level filter) is not applied in the driver
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray 2.60 logs "Reporting training result N: <every metric>" through a logger named after its source
    # *file*, which Train's own log-level filter misses; silence just that one.
    with contextlib.suppress(Exception):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    for name in ("lm", "lmplatform"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
