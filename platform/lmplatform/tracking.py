"""MLflow tracking: one experiment per experiment name, one run per training run.

The driver (:class:`RunTracker`) opens the run, logs the resolved config as params plus system tags, and at the
end logs weights-only checkpoints, a loss-curve PNG and sample generations, registers the best checkpoint as
a version of ``lmlab-<experiment>`` and ends the run FINISHED, FAILED or KILLED, never leaving it RUNNING.
Per-step metrics come from the process that trains (rank 0, or the driver itself with ``--local``) through the
picklable :class:`MetricLogger`, so they reach MLflow while the run is going, not only at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform as std_platform
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.checkpoint import CONFIG, METRICS, TOKENIZER, WEIGHTS
from lm.config import ExperimentConfig, SampleConfig, dump_config, flatten, to_dict
from lm.data import file_sha256
from lm.train import Hooks
from lmplatform.config import PlatformConfig

if TYPE_CHECKING:  # mlflow costs about a second to import; only the functions that talk to it import it
    from mlflow import MlflowClient

log = logging.getLogger("lmplatform.tracking")

# What a served model needs; trainer.pt (optimizer, RNG) triples the size and nobody serves it.
WEIGHTS_ONLY_FILES = (WEIGHTS, CONFIG, TOKENIZER, METRICS)
BEST_ALIAS = "best"
RUN_DIR_TAG = "lmlab.run_dir"  # where the run directory is, for display; never used to find a run
RUN_ID_FIELD = "mlflow_run_id"  # the run.json field that identifies a run directory's MLflow run
STEP_TAG = "lmlab.step"  # the final step, so listings need no metric history
DEVICE_TAG = "lmlab.device"  # only from RunTracker.set_device: the device the loop used
FAILURE_TAG = "lmlab.failure"
DEV_SPLIT_TAG = "lmlab.dev_split"  # which dev text a version was scored on: only equal ones compete
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
FINAL_CHECKPOINT_TAG = "lmlab.final_checkpoint"  # local paths the launcher handed to finish()
BEST_CHECKPOINT_TAG = "lmlab.best_checkpoint"
BEST_ARTIFACT_TAG = "lmlab.best_artifact"  # the run's artifact path holding its best checkpoint
BEST_SHA_TAG = "lmlab.best_sha256"
WEIGHTS_SHA_TAG = "lmlab.weights_sha256"  # on model versions
LOSS_CURVE = "loss_curve.png"
JOB_TAG = "lmlab.ray_job"  # the Ray job submission id of a run `lm job` submitted
JOB_ENV = "LMLAB_RAY_JOB"  # ...which `lm job` hands to the job in this environment variable
_PARAM_LIMIT = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3
_TAG_LIMIT = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_BATCH_LIMIT = 100  # params/tags per log_batch call
_MAX_PARAM_COLUMNS = 8


class TrackingError(RuntimeError):
    """The MLflow store, an experiment or a run cannot be found or used."""


def registered_model_name(experiment: str) -> str:
    """The registry name under which an experiment's best checkpoints are versioned."""
    return f"lmlab-{experiment}"


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient for ``uri`` with MLflow's own chatter (DB migrations, progress bars) turned down."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------------------------------------------
# Training side: metrics from the process that trains


@dataclass
class MetricLogger:
    """Logs metrics to one MLflow run from any process; pickles to Ray workers as just (uri, run id)."""

    uri: str
    run_id: str
    _client: Any = field(default=None, repr=False, compare=False)
    _warming: threading.Thread | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "_client": None, "_warming": None}

    def warm_up(self) -> None:
        """Import mlflow and open the store in the background (about 2 s) while data and model are prepared.

        :class:`TrackingHooks` waits for it in ``on_start``, before the training clock starts: done lazily
        inside the loop instead, the import would stall the first logged step, or compete with it for the
        CPU, and eat into a ``train.max_seconds`` budget.
        """
        if self._client is None and self._warming is None:
            self._warming = threading.Thread(target=self._connect, name="mlflow-warm-up", daemon=True)
            self._warming.start()

    def ready(self) -> None:
        """Block until the store is open (the warm-up finished, or connect now)."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        if self._client is None:
            self._connect()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log every finite metric except the step counter itself at ``step``."""
        from mlflow.entities import Metric

        self.ready()
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in _finite_metrics(metrics).items()]
        if not batch:
            return
        for attempt in range(_TRANSPORT_RETRIES + 1):
            try:
                self._client.log_batch(self.run_id, metrics=batch)
                return
            except Exception as exc:
                if attempt == _TRANSPORT_RETRIES or not _broke_in_transport(exc):
                    raise
                log.warning("logging step %d's metrics broke off (%s); sending them again", step, exc)
                time.sleep(1.0)

    def close(self) -> None:
        """Nothing to end (as :meth:`MetricRelay.close`)."""

    def _connect(self) -> None:
        self._client = mlflow_client(self.uri)


# MLflow's client retries a refused connection (about two minutes, while a server restarts) but not a response the
# server broke off mid-way (it died while answering): that surfaces at once, as an MlflowException whose context
# is the requests error. Sending the same batch again is safe: the store skips a metric (key, value, timestamp,
# step) it already holds, and the next attempt waits out the restart in MLflow's own retries.
_TRANSPORT_RETRIES = 2


def _broke_in_transport(exc: BaseException) -> bool:
    """Whether ``exc`` is an MLflow request that failed in the connection (no HTTP answer), not an error answer."""
    import requests

    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError))


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Every finite number in ``metrics`` except the step counter itself."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
    }


_RELAY_NAMESPACE = "lmlab-metrics"  # the GCS key-value namespace of rank 0's metrics for the driver


class MetricRelay:
    """Rank 0's metric logger on Ray: sends each batch to the driver, whose :class:`MetricInbox` logs it.

    The driver has the MLflow run open already. Logging from the worker meant importing MLflow and opening the
    store there too: 2-4 s of the worker's start, before its first step, on 2 cores. The batches travel through
    Ray's GCS key-value store (``ray.experimental.internal_kv``, as the stop flag does), one key each, numbered
    in order, from a sender thread, so a slow or paused GCS never holds up a training step. Pickles as its key
    prefix, run id and store URI.
    """

    def __init__(self, prefix: str, run_id: str, uri: str) -> None:
        self.prefix = prefix
        self.run_id = run_id
        self.uri = uri  # the driver's store, for display: rank 0 never opens it
        self._sent: queue.Queue[tuple[str, bytes] | None] | None = None
        self._sender: threading.Thread | None = None
        self._count = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "run_id": self.run_id, "uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"], state["run_id"], state["uri"])  # type: ignore[misc]

    def warm_up(self) -> None:
        """Nothing to open: the driver's store is open."""

    def ready(self) -> None:
        """Nothing to wait for (as :meth:`MetricLogger.ready`)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Send every finite metric except the step counter itself, at ``step`` and now."""
        batch = _finite_metrics(metrics)
        if not batch:
            return
        if self._sender is None:
            # this process's batches sort after any an earlier attempt of the run left unread, and in order
            self._attempt = f"{time.time_ns():020d}-{os.getpid()}"
            self._sent = queue.Queue()
            self._sender = threading.Thread(target=self._send, name="lmlab-metric-relay", daemon=True)
            self._sender.start()
        assert self._sent is not None
        self._count += 1
        key = f"{self.prefix}/{self._attempt}/{self._count:010d}"
        self._sent.put((key, json.dumps([step, int(time.time() * 1000), batch]).encode()))

    def close(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout`` seconds) until every batch is in the GCS, and end the sender thread: the driver
        finds every batch once the run is over. A later :meth:`log` starts a new sender."""
        if self._sender is not None and self._sent is not None:
            self._sent.put(None)
            self._sender.join(timeout)
            if self._sender.is_alive():
                log.warning("rank 0's last metrics did not reach Ray's GCS in %.0f s", timeout)
            self._sender = None

    def _send(self) -> None:
        from ray.experimental import internal_kv

        assert self._sent is not None
        while (item := self._sent.get()) is not None:
            key, value = item
            for attempt in range(3):  # a GCS that restarts: retry; a batch is lost only after three failures
                try:
                    internal_kv._internal_kv_put(key, value, namespace=_RELAY_NAMESPACE)
                    break
                except Exception as exc:  # noqa: BLE001
                    if attempt == 2:
                        log.warning("a metric batch for the driver was lost: %s", exc)
                    time.sleep(0.5)


class MetricInbox:
    """The driver's end of :class:`MetricRelay`: logs what rank 0 sent into the MLflow run, in order."""

    def __init__(self, tracker: RunTracker) -> None:
        self.client = tracker.client
        self.run_id = tracker.run_id
        self.uri = tracker.uri
        self.prefix = f"{tracker.run_id}-{uuid.uuid4().hex[:8]}"
        self._keys = f"{self.prefix}/"  # every key rank 0 writes starts so
        self._warned = False

    def relay(self) -> MetricRelay:
        """The logger to ship to rank 0."""
        return MetricRelay(self.prefix, self.run_id, self.uri)

    def drain(self) -> int:
        """Log every batch that has arrived and delete its key; the number logged.

        A failure to log (the store is down) leaves the batches to the next call, with one warning.
        """
        from mlflow.entities import Metric
        from ray.experimental import internal_kv

        logged = 0
        try:
            keys = sorted(internal_kv._internal_kv_list(self._keys, namespace=_RELAY_NAMESPACE))
            for key in keys:
                value = internal_kv._internal_kv_get(key, namespace=_RELAY_NAMESPACE)
                if value is not None:
                    step, timestamp, batch = json.loads(value)
                    metrics = [Metric(name, value, timestamp, step) for name, value in batch.items()]
                    self.client.log_batch(self.run_id, metrics=metrics)
                    logged += 1
                internal_kv._internal_kv_del(key, namespace=_RELAY_NAMESPACE)
        except Exception as exc:  # noqa: BLE001  (the next drain retries; close says what stayed unlogged)
            if not self._warned:
                log.warning("could not log rank 0's metrics yet (will retry): %s", exc)
                self._warned = True
        return logged

    def close(self) -> None:
        """The last :meth:`drain`; then whatever could not be logged is dropped from the GCS, with a warning (a
        cluster this run joined outlives it). Never raises: training is over, and its checkpoints are saved."""
        from ray.experimental import internal_kv

        self.drain()
        try:
            left = internal_kv._internal_kv_list(self._keys, namespace=_RELAY_NAMESPACE)
            if left:
                log.warning(
                    "%d batches of rank 0's metrics could not be logged to run %s", len(left), self.run_id
                )
                internal_kv._internal_kv_del(self._keys, del_by_prefix=True, namespace=_RELAY_NAMESPACE)
        except Exception as exc:  # noqa: BLE001  (Ray is gone: so are the keys)
            log.debug("could not clear the metric keys: %s", exc)


class TrackingHooks(Hooks):
    """lm.train hooks that send train and eval metrics to MLflow (use on rank 0 only).

    With ``record_dir`` (the in-process loop's run directory), ``on_start`` writes the MLflow run id into the
    directory's run.json again: a --restart clears run.json after the tracker first recorded it there.
    """

    def __init__(self, logger: MetricLogger, record_dir: str | Path | None = None) -> None:
        self.logger = logger
        self.record_dir = record_dir

    def on_start(self) -> None:
        """Finish opening the store before the training clock starts; record the MLflow run id."""
        if self.record_dir is not None:
            _record_run_id(self.record_dir, self.logger.run_id)
        self.logger.ready()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """train_loss, lr, tokens_per_s, grad_norm, ... at this step."""
        self.logger.log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """dev_loss, dev_ppl, dev_bpb (the final evaluation adds val_loss, val_ppl, val_bpb, tokens, ...)."""
        self.logger.log(step, metrics)


# --------------------------------------------------------------------------------------------------------------
# Driver side: the run's lifetime, params, artifacts, registry


class RunTracker:
    """The driver's handle on one MLflow run: opened by :meth:`start`, closed by :meth:`track`'s exit.

    ``status`` is what :meth:`track` ends the run with when its body returns normally: set it to "KILLED" when
    the loop returned interrupted. :meth:`fail` ends the run FAILED at once with a reason.
    """

    def __init__(
        self,
        client: MlflowClient,
        uri: str,
        experiment: str,
        run_id: str,
        resumed: bool,
        record_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self.resumed = resumed
        self.record_dir = record_dir
        self.status = "FINISHED"
        self.ended: str | None = None  # the status the run was ended with, once it was
        self.model_version: str | None = None
        self.alias_note: str | None = None  # why alias `best` moved or stayed, after a registration
        self._pending_tags: dict[str, str] = {}  # written with the next batch (finish or the end)

    @classmethod
    def start(
        cls,
        cfg: ExperimentConfig,
        pcfg: PlatformConfig,
        run_dir: str,
        *,
        launcher: str,
        resume: bool = True,
        tokenizer_path: Path | None = None,
        record_dir: str | Path | None = None,
        run_id: str | None = None,
    ) -> RunTracker:
        """Open a new run, or with ``resume`` reopen the one ``record_dir``'s run.json names; log the config.

        ``record_dir`` defaults to ``run_dir`` when that is a local directory. A run is reopened only through
        the ``mlflow_run_id`` recorded there (never by matching the ``lmlab.run_dir`` tag, which is for
        display): no record, ``resume=False`` (--restart), or a recorded run the store no longer has in this
        experiment all start a new MLflow run, whose id is then recorded. ``run_id`` (a sweep's child run, found
        by its trial tag) is reopened instead, whatever the record says. Any failure after the run exists
        ends it FAILED with the reason.
        """
        tc = pcfg.tracking
        assert tc.uri is not None and tc.experiment is not None, "call resolve_platform first"
        record = Path(record_dir) if record_dir is not None else None
        if record is None and "://" not in run_dir:
            record = Path(run_dir)
        client = mlflow_client(tc.uri)
        experiment_id = _experiment_id(client, tc.experiment, tc.artifact_location)
        if run_id is not None:
            previous = client.get_run(run_id)
        else:
            previous = _recorded_run(client, experiment_id, record) if resume and record is not None else None
        if previous is not None:
            client.update_run(previous.info.run_id, status="RUNNING")
            run_id = previous.info.run_id
        else:
            if record is None:
                log.warning(
                    "no local run directory to record the MLflow run in: %s starts a new run", run_dir
                )
            run_name = pcfg.ray.run_name if launcher == "ray" else Path(run_dir).name
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        tracker = cls(client, tc.uri, tc.experiment, run_id, previous is not None, record)
        try:
            if record is not None:
                _record_run_id(record, run_id)
            tracker._log_start(cfg, pcfg, run_dir, launcher, tokenizer_path, previous)
        except BaseException as exc:
            tracker.fail(f"while starting: {_summary(exc)}")
            raise
        return tracker

    @property
    def logger(self) -> MetricLogger:
        """A metric logger for this run that can be shipped to a Ray worker."""
        return MetricLogger(self.uri, self.run_id)

    def hooks(self) -> TrackingHooks:
        """lm.train hooks for the process that trains in this one (--local, Ray's local mode)."""
        return TrackingHooks(self.logger, self.record_dir)

    @property
    def artifact_uri(self) -> str:
        """Root of this run's artifacts."""
        return self.client.get_run(self.run_id).info.artifact_uri

    def set_device(self, device: str | Any) -> None:
        """Record the device the loop actually used (rank 0's ``torch.device``) as tag ``lmlab.device``."""
        self._pending_tags[DEVICE_TAG] = str(device)
        if self.ended is not None:
            self._flush_tags()

    @contextlib.contextmanager
    def track(self) -> Iterator[RunTracker]:
        """End the run with ``self.status`` (FINISHED unless set), KILLED on Ctrl-C, FAILED on an exception."""
        try:
            yield self
        except KeyboardInterrupt:
            self.end("KILLED", "interrupted (Ctrl-C)")
            raise
        except BaseException as exc:
            self.fail(_summary(exc))
            raise
        else:
            self.end(self.status)
        finally:
            if self.record_dir is not None:  # the loop may have replaced run.json (--restart)
                with contextlib.suppress(Exception):
                    _record_run_id(self.record_dir, self.run_id)

    def fail(self, reason: str) -> None:
        """End the run FAILED with ``reason`` in tag ``lmlab.failure`` and the run's description."""
        reason = _one_line(reason)
        self.end("FAILED", f"failed: {reason}", {FAILURE_TAG: reason})

    def end(self, status: str, description: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """End the run with ``status`` (FINISHED, KILLED, FAILED) once; pending tags go in the same batch."""
        if self.ended is not None:
            return
        self._pending_tags.update(tags or {})
        if description is not None:
            self._pending_tags[NOTE_TAG] = description
        try:
            self._flush_tags()
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self.ended = status
            log.info("MLflow run %s ended %s", self.run_id, status)

    def _flush_tags(self) -> None:
        from mlflow.entities import RunTag

        if self._pending_tags:
            tags = [RunTag(k, _tag_value(v)) for k, v in self._pending_tags.items()]
            self._pending_tags = {}
            self.client.log_batch(self.run_id, tags=tags)

    def _log_start(
        self,
        cfg: ExperimentConfig,
        pcfg: PlatformConfig,
        run_dir: str,
        launcher: str,
        tokenizer: Path | None,
        previous: Any,
    ) -> None:
        from mlflow.entities import Param, RunTag

        params = {k: _param_value(v) for k, v in flatten(to_dict(cfg)).items()}
        if launcher == "ray":
            params |= {f"ray.{k}": _param_value(v) for k, v in to_dict(pcfg.ray).items() if k != "address"}
        logged = previous.data.params if previous is not None else {}
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:  # lm.train already warned about the change itself; this says where MLflow keeps it
            log.info(
                "MLflow keeps a reopened run's first param values; the changes are in tags lmlab.changed.*: %s",
                ", ".join(changed),
            )
        new_params = [Param(k, v) for k, v in params.items() if k not in logged]
        tag_values = _system_tags(cfg, pcfg, run_dir, launcher)
        tag_values |= {f"lmlab.changed.{k}": f"{logged[k]} -> {v}" for k, v in changed.items()}
        if (
            previous is not None and FAILURE_TAG in previous.data.tags
        ):  # an earlier attempt's failure is history
            tag_values |= {NOTE_TAG: f"resumed after: {previous.data.tags[FAILURE_TAG]}"}
            self.client.delete_tag(self.run_id, FAILURE_TAG)
        tags = [RunTag(k, _tag_value(v)) for k, v in tag_values.items()]
        for i in range(0, max(len(new_params), len(tags)), _BATCH_LIMIT):
            self.client.log_batch(
                self.run_id, params=new_params[i : i + _BATCH_LIMIT], tags=tags[i : i + _BATCH_LIMIT]
            )
        self.client.log_text(self.run_id, dump_config(cfg), CONFIG)
        if launcher == "ray":
            self.client.log_text(self.run_id, dump_config(pcfg), "platform.yaml")
        if tokenizer is not None:
            self.client.log_artifact(self.run_id, str(tokenizer))

    def conclude(
        self,
        cfg: ExperimentConfig,
        *,
        interrupted: bool,
        final: Path | None,
        best: Path | None,
        trained_steps: int,
        register: bool,
        device: str | Any | None,
    ) -> None:
        """After the loop returned: the device it really used; KILLED if it was stopped at a checkpoint (nothing
        registered), else the artifacts and the registry through :meth:`finish`."""
        if device is not None:
            self.set_device(device)
        if interrupted:
            self.status = "KILLED"
        else:
            self.finish(cfg, final, best, register, trained_steps=trained_steps)

    def finish(
        self,
        cfg: ExperimentConfig,
        final: Path | None,
        best: Path | None,
        register: bool = True,
        *,
        trained_steps: int,
    ) -> None:
        """Log the weights-only final and best checkpoints, the loss curve and samples; maybe register best.

        The best checkpoint goes under an immutable path (``checkpoints/best-step-<step>``, never written twice),
        which is what a model version points at. It is registered only when ``register`` and this invocation
        trained (``trained_steps > 0``), and not again when an earlier version already holds the same weights.
        """
        best = best or final
        if final is not None:
            if "step" in (metrics := _read_metrics(final)):
                self._pending_tags[STEP_TAG] = str(int(metrics["step"]))
            self._pending_tags[FINAL_CHECKPOINT_TAG] = str(final)
        best_artifact = None
        with tempfile.TemporaryDirectory(prefix="lmlab-mlflow-") as tmp:
            if final is not None:
                staged = _weights_only_copy(final, Path(tmp) / "final")
                self.client.log_artifacts(self.run_id, str(staged), "checkpoints/final")
            if best is not None:
                best_artifact, sha = self._log_best(best, Path(tmp) / "best")
                self._pending_tags |= {
                    BEST_CHECKPOINT_TAG: str(best),
                    BEST_ARTIFACT_TAG: best_artifact,
                    BEST_SHA_TAG: sha,
                }
            png = Path(tmp) / LOSS_CURVE
            if plot_loss_curve(self.client, self.run_id, png):
                self.client.log_artifact(self.run_id, str(png))
            if best is not None and cfg.sample.num_samples > 0:
                self.client.log_text(self.run_id, format_samples(best, cfg.sample), "samples.txt")
        self._flush_tags()
        if best is None or best_artifact is None:
            return
        if not register:
            log.info("not registered: tracking.register_model is false")
        elif trained_steps <= 0:
            log.info("not registered: this invocation trained no steps (the checkpoint is not new)")
        else:
            self.model_version = self.register_best(best, best_artifact)

    def _log_best(self, best: Path, staging: Path) -> tuple[str, str]:
        """Log ``best`` weights-only under a path no later write touches; returns (artifact path, sha256)."""
        sha = file_sha256(best / WEIGHTS)
        tags = self.client.get_run(self.run_id).data.tags
        if tags.get(BEST_SHA_TAG) == sha and tags.get(BEST_ARTIFACT_TAG):
            return tags[BEST_ARTIFACT_TAG], sha  # already logged by an earlier invocation of this run
        step = _read_metrics(best).get("step")
        base = f"checkpoints/best-step-{int(step)}" if isinstance(step, (int, float)) else "checkpoints/best"
        taken = {item.path for item in self.client.list_artifacts(self.run_id, "checkpoints")}
        path = base if base not in taken else f"{base}-{sha[:12]}"
        if path not in taken:  # the sha-suffixed path, when taken, already holds exactly these weights
            self.client.log_artifacts(self.run_id, str(_weights_only_copy(best, staging)), path)
        return path, sha

    def register_best(self, best: Path, artifact_path: str) -> str:
        """Add ``best`` (logged at ``artifact_path``) as a model version; move alias ``best`` if it wins.

        A version of this run that already holds the same weights (same sha256) is returned instead of a
        duplicate. Tags carry the checkpoint's metrics.json numbers (dev_* and val_*).
        """
        from mlflow.exceptions import MlflowException

        name = registered_model_name(self.experiment)
        sha = file_sha256(best / WEIGHTS)
        with contextlib.suppress(MlflowException):  # the model does not exist yet
            for found in self.client.search_model_versions(f"run_id = '{_quote(self.run_id)}'"):
                if found.name == name and (found.tags or {}).get(WEIGHTS_SHA_TAG) == sha:
                    log.info(
                        "%s version %s already holds this checkpoint: not registered again",
                        name,
                        found.version,
                    )
                    return str(found.version)
        metrics = _read_metrics(best)
        try:  # a read first: a failed create is still a write that takes SQLite's lock
            self.client.get_registered_model(name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # another process created it meanwhile
                self.client.create_registered_model(
                    name, description=f"Best checkpoints of lmlab experiment {self.experiment!r}"
                )
        tags = {k: str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        tags |= {
            WEIGHTS_SHA_TAG: sha,
            "lmlab.artifact_path": artifact_path,
            DEV_SPLIT_TAG: dev_split_id(best),
        }
        from lmplatform.pyfunc import register_logged_model

        description = f"{describe_metrics(metrics)} (run {self.run_id})"
        try:
            model = self._log_pyfunc(best, artifact_path)
        except Exception as exc:  # packaging must not cost a finished run its registration
            log.warning(
                "%s could not be logged as an MLflow pyfunc model (%s): registering the plain checkpoint, which "
                "lm serve and lm eval load but mlflow.pyfunc does not", artifact_path, _summary(exc),
            )  # fmt: skip
            version = self.client.create_model_version(
                name, source=f"{self.artifact_uri}/{artifact_path}", run_id=self.run_id, tags=tags,
                description=description,
            )  # fmt: skip
        else:
            version = register_logged_model(self.uri, name, model, tags, description)
        log.info("registered %s version %s from %s", name, version.version, artifact_path)
        _, self.alias_note = update_best_alias(self.client, name)
        log.debug("%s", self.alias_note)  # the launcher prints it in its summary
        return str(version.version)

    def _log_pyfunc(self, best: Path, artifact_path: str) -> Any:
        """``best`` weights-only as an MLflow Model with a pyfunc flavor (lmplatform.pyfunc): a LoggedModel of
        this run that ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load, and Serve too."""
        from lmplatform.pyfunc import log_pyfunc_model

        step = _read_metrics(best).get("step")
        with tempfile.TemporaryDirectory(prefix="lmlab-pyfunc-") as tmp:
            staged = _weights_only_copy(best, Path(tmp) / "checkpoint")
            return log_pyfunc_model(
                self.uri, self.run_id, staged, Path(artifact_path).name,
                step=int(step) if isinstance(step, (int, float)) else 0,
            )  # fmt: skip


def dev_split_id(checkpoint: Path) -> str:
    """Which dev text a checkpoint was scored on (corpus and split fractions from its own config): dev bits/byte
    compare across tokenizers, not across dev texts."""
    from lm.config import load_config

    data = load_config(checkpoint / CONFIG, follow_extends=False).data
    key = f"{data.corpus}|dev={data.dev_fraction}|val={data.val_fraction}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def describe_metrics(metrics: Mapping[str, Any]) -> str:
    """A checkpoint's numbers as the command prints them: val perplexity and bits/byte, dev bits/byte, step."""
    parts = []
    if isinstance(metrics.get("val_ppl"), (int, float)):
        parts.append(f"val perplexity {metrics['val_ppl']:.2f}")
    if isinstance(metrics.get("val_bpb"), (int, float)):
        parts.append(f"{metrics['val_bpb']:.4f} bits/byte")
    if isinstance(metrics.get("dev_bpb"), (int, float)):
        parts.append(f"dev {metrics['dev_bpb']:.4f} bits/byte")
    if isinstance(metrics.get("step"), (int, float)):
        parts.append(f"step {int(metrics['step']):,}")
    return ", ".join(parts) or "no metrics"


def update_best_alias(client: MlflowClient, name: str) -> tuple[str | None, str]:
    """Point alias ``best`` at the version with the lowest dev bits per byte; return (version, why).

    Dev, because every choice between checkpoints looks at the dev split only (val is what is reported);
    bits per byte, because versions of one experiment may use different tokenizers, and nats per token do
    not compare across tokenizers. Versions without dev_bpb (registered before the dev split) do not compete.
    """
    from mlflow.exceptions import MlflowException

    def bpb(version: Any) -> float | None:
        value = _float((version.tags or {}).get("dev_bpb"))
        return value if value is not None and math.isfinite(value) else None

    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{_quote(name)}'")}
    holder = None
    with contextlib.suppress(MlflowException):
        holder = str(client.get_model_version_by_alias(name, BEST_ALIAS).version)

    # Only versions scored on the newest one's dev text compete (another corpus or dev_fraction is other text).
    def dev_split(key: str | None) -> str | None:
        version = versions.get(key) if key is not None else None
        return (version.tags or {}).get(DEV_SPLIT_TAG) if version is not None else None

    split = dev_split(max(versions, key=int)) if versions else None
    other_split = holder is not None and dev_split(holder) != split
    scored = {
        k: s
        for k, v in versions.items()
        if (s := bpb(v)) is not None and (v.tags or {}).get(DEV_SPLIT_TAG) == split
    }
    if not scored:
        return holder, f"alias {BEST_ALIAS} unchanged (version {holder}): no version has dev bits/byte"
    winner = min(scored, key=lambda k: (scored[k], k != holder, int(k)))  # a tie keeps the holder
    newest = max(versions, key=int)
    if winner == holder:
        if newest == winner:
            return holder, f"alias {BEST_ALIAS} stays on version {holder}"
        new_bpb = "none" if newest not in scored else f"{scored[newest]:.4f}"
        return holder, (
            f"alias {BEST_ALIAS} stayed on version {holder} (dev bits/byte {scored[holder]:.4f} <= {new_bpb} "
            f"of version {newest})"
        )
    client.set_registered_model_alias(name, BEST_ALIAS, winner)
    if holder is None:
        why = f"dev bits/byte {scored[winner]:.4f}, the first version to hold the alias"
    elif other_split:
        why = (
            f"dev bits/byte {scored[winner]:.4f}; version {holder} was scored on other dev text (another corpus "
            "or dev_fraction), so it does not compete"
        )
    elif holder in scored:
        why = f"dev bits/byte {scored[winner]:.4f} < {scored[holder]:.4f} of version {holder}"
    else:
        why = f"dev bits/byte {scored[winner]:.4f}; version {holder} has no dev bits/byte"
    return winner, f"alias {BEST_ALIAS} -> version {winner} ({why})"


def start_run(
    cfg: ExperimentConfig,
    pcfg: PlatformConfig,
    run_dir: str,
    *,
    launcher: str,
    resume: bool = True,
    tokenizer_path: Path | None = None,
    record_dir: str | Path | None = None,
    run_id: str | None = None,
) -> RunTracker | None:
    """:meth:`RunTracker.start`, or None when ``tracking.enabled`` is false."""
    if not pcfg.tracking.enabled:
        return None
    return RunTracker.start(
        cfg,
        pcfg,
        run_dir,
        launcher=launcher,
        resume=resume,
        tokenizer_path=tokenizer_path,
        record_dir=record_dir,
        run_id=run_id,
    )


# --------------------------------------------------------------------------------------------------------------
# Artifacts


def plot_loss_curve(client: MlflowClient, run_id: str, path: Path) -> bool:
    """Plot logged train_loss and dev_loss (what picks ``best``) against step into ``path``; False if neither
    was logged."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    series = {key: _history(client, run_id, key) for key in ("train_loss", "dev_loss")}
    if not any(series.values()):
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "dev_loss" else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"run {run_id[:8]}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """Metric history by step; a step logged twice (retrained after a restart) keeps its latest value."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return sorted((step, value) for step, (_, value) in latest.items())


def format_samples(checkpoint: Path, sample: SampleConfig) -> str:
    """``sample.num_samples`` generations from ``checkpoint`` with the experiment's sampling settings."""
    import torch

    from lm.checkpoint import load_model
    from lm.generate import iter_generate

    model, _, tokenizer = load_model(checkpoint, "cpu")
    header = (
        f"checkpoint: {checkpoint.name}, prompt {sample.prompt!r}, temperature {sample.temperature}, "
        f"top-k {sample.top_k}, top-p {sample.top_p}, seed {sample.seed}"
    )
    out = [header]
    for i in range(sample.num_samples):
        ids = tokenizer.encode(sample.prompt) or [tokenizer.eos_id]
        idx = torch.tensor([ids], dtype=torch.long)
        generator = torch.Generator().manual_seed(sample.seed + i)
        new: list[int] = []
        steps = iter_generate(
            model, idx, sample.max_new_tokens, sample.temperature, sample.top_k, sample.top_p, tokenizer.eos_id,
            generator,
        )  # fmt: skip
        for token in steps:
            t = int(token[0])
            if t == tokenizer.eos_id:
                break
            new.append(t)
        out.append(f"--- sample {i + 1} ---\n{sample.prompt}{tokenizer.decode(new)}")
    return "\n\n".join(out) + "\n"


def _weights_only_copy(checkpoint: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in WEIGHTS_ONLY_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, dest / name)
    return dest


def _read_metrics(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / METRICS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------------------------
# Terminal views: lm runs list / lm runs show


def list_runs(uri: str, experiment: str | None = None, max_results: int = 50) -> str:
    """A table of runs (newest first): id, name, status, final val ppl and bits/byte, the last dev ppl, and the
    params that differ."""
    client = _existing_store(uri)
    experiments = _experiments(client, experiment)
    if not experiments:
        return f"no experiments in {uri} yet: train one with `lm train experiments/tiny.yaml`"
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(list(names), max_results=max_results, order_by=["attributes.start_time DESC"])
    if not runs:
        return f"no runs in {', '.join(names.values())} ({uri})"
    params = [r.data.params for r in runs]
    # Keys some runs lack (ray.* in a --local run) are launcher differences, not experiment differences.
    differing = sorted(k for k in set().union(*params) if len({p[k] for p in params if k in p}) > 1)
    hidden = differing[_MAX_PARAM_COLUMNS:]
    differing = differing[:_MAX_PARAM_COLUMNS]
    header = ["run id", "experiment", "name", "status", "started", "step", "val ppl", "bits/byte", "dev ppl"]
    header += differing
    rows = [header]
    for r in runs:
        m = r.data.metrics
        rows.append([
            r.info.run_id, names.get(r.info.experiment_id, "?"), r.info.run_name or "", r.info.status,
            _fmt_time(r.info.start_time), r.data.tags.get(STEP_TAG, "-"),
            _fmt_num(m.get("val_ppl"), "{:.2f}"), _fmt_num(m.get("val_bpb"), "{:.4f}"),
            _fmt_num(m.get("dev_ppl"), "{:.2f}"),
            *(r.data.params.get(k, "-") for k in differing),
        ])  # fmt: skip
    note = f"\n({len(hidden)} more differing params: {', '.join(hidden)})" if hidden else ""
    return _table(rows) + note


def show_run(uri: str, run_id: str) -> str:
    """One run: status, where its checkpoints, best checkpoint and loss curve are (on disk and in MLflow), its
    model versions with aliases, then tags, latest metrics, params and artifact files."""
    client = _existing_store(uri)
    run = _find_run(client, run_id)
    info, data = run.info, run.data
    tags = data.tags
    experiment = client.get_experiment(info.experiment_id)
    duration = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    lines = [
        f"run {info.run_id}  {info.run_name or ''}",
        f"  experiment  {experiment.name} ({info.experiment_id})",
        f"  status      {info.status}" + (f" ({tags[FAILURE_TAG]})" if tags.get(FAILURE_TAG) else ""),
        f"  started     {_fmt_time(info.start_time)}"
        + (f"  ({duration:.1f}s)" if duration is not None else ""),
        f"  device      {tags.get(DEVICE_TAG, 'not recorded')}",
        "where:",
        *_where(client, info, tags),
    ]
    versions = client.search_model_versions(f"run_id = '{_quote(info.run_id)}'")
    if versions:
        lines.append("model versions:")
        for found in sorted(versions, key=lambda v: int(v.version)):
            v = client.get_model_version(found.name, found.version)  # search results leave aliases out
            aliases = f" (aliases: {', '.join(v.aliases)})" if v.aliases else ""
            lines.append(f"  models:/{v.name}/{v.version}{aliases}  {v.description or ''}".rstrip())
            lines.append(f"    source {v.source}")
    lines += [
        "tags:",
        *(f"  {k} = {v}" for k, v in sorted(tags.items()) if not k.startswith("mlflow.")),
        "metrics (latest value):",
        *(f"  {k} = {v:.6g}" for k, v in sorted(data.metrics.items())),
        "params:",
        *(f"  {k} = {v}" for k, v in sorted(data.params.items())),
        "artifact files:",
        *(f"  {p}" for p in _artifact_paths(client, info.run_id)),
    ]
    return "\n".join(lines)


def _where(client: MlflowClient, info: Any, tags: Mapping[str, str]) -> list[str]:
    """Lines naming the run directory (and its run.json), local checkpoints, and the MLflow copies."""
    from lm.checkpoint import CheckpointError, read_run_record

    rows: list[tuple[str, str]] = []
    run_dir = tags.get(RUN_DIR_TAG)
    if run_dir:
        local = Path(run_dir) if "://" not in run_dir else None
        state, steps = "not on this machine", []
        if local is not None and local.is_dir():
            try:
                record = read_run_record(local)
                state = "no run.json"
            except CheckpointError as exc:
                record, state = {}, str(exc)
            if record:
                state = f"run.json: {record.get('status', '?')} at step {record.get('step', '?')}"
                if record.get(RUN_ID_FIELD) != info.run_id:
                    state += f"; the directory now belongs to MLflow run {record.get(RUN_ID_FIELD) or 'none'}"
            steps = sorted(
                p.name for p in local.iterdir() if p.is_dir() and p.name.startswith(("step-", "checkpoint_"))
            )
        rows.append(("run dir", f"{run_dir} ({state})"))
        if steps:
            rows.append(("checkpoints", f"{local}: {', '.join(steps)}"))
    for label, key in (("best", BEST_CHECKPOINT_TAG), ("final", FINAL_CHECKPOINT_TAG)):
        if tags.get(key):
            rows.append((label, tags[key] + ("" if Path(tags[key]).is_dir() else " (no longer on disk)")))
    root = info.artifact_uri.rstrip("/")
    rows.append(("artifacts", root))
    if tags.get(BEST_ARTIFACT_TAG):
        rows.append(("best in mlflow", f"{root}/{tags[BEST_ARTIFACT_TAG]}"))
    if tags.get(FINAL_CHECKPOINT_TAG):
        rows.append(("final in mlflow", f"{root}/checkpoints/final"))
    if any(item.path == LOSS_CURVE for item in client.list_artifacts(info.run_id)):
        rows.append(("loss curve", f"{root}/{LOSS_CURVE}"))
    return [f"  {label:<15} {value}" for label, value in rows]


def download_checkpoint(uri: str, ref: str, dest: Path | None = None) -> Path:
    """Download the weights-only checkpoint ``ref`` names from the store at ``uri``; return its directory.

    ``ref`` is an MLflow run id or a unique prefix of one (its best checkpoint), ``models:/name@alias`` or
    ``models:/name/version``. ``dest`` (default: a new temp dir) receives a folder named after the artifact;
    for a version logged as an MLflow Model (pyfunc), the checkpoint inside it is returned.
    """
    from lmplatform.models import download_model  # resolution lives there, shared with Serve

    return download_model(ref, uri, dest).checkpoint


def _model_version(client: MlflowClient, ref: str) -> Any:
    """The model version ``models:/name@alias`` or ``models:/name/version`` names, or a TrackingError."""
    from mlflow.exceptions import MlflowException

    rest = ref[len("models:/") :]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
    if not name or not (alias or (version or "").isdigit()):
        raise TrackingError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise TrackingError(f"{ref!r}: no registered model {name!r} (registered: {known})") from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        if alias is not None:
            known = ", ".join(sorted(model.aliases)) or "none"
            raise TrackingError(
                f"{ref!r}: model {name!r} has no alias {alias!r} (aliases: {known})"
            ) from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{_quote(name)}'"))
        raise TrackingError(
            f"{ref!r}: model {name!r} has no version {version} (versions: {', '.join(map(str, versions)) or 'none'})"
        ) from None


def _best_artifact(client: MlflowClient, run: Any) -> str:
    """The artifact path of a run's best checkpoint (older runs: checkpoints/best, else checkpoints/final)."""
    if run.data.tags.get(BEST_ARTIFACT_TAG):
        return run.data.tags[BEST_ARTIFACT_TAG]
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "checkpoints")}
    for path in ("checkpoints/best", "checkpoints/final"):
        if path in logged:
            return path
    raise TrackingError(f"run {run.info.run_id} logged no checkpoint (status {run.info.status})")


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it between our look-up and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _recorded_run(client: MlflowClient, experiment_id: str, record_dir: Path) -> Any | None:
    """The MLflow run ``record_dir``'s run.json names, if this store still has it in this experiment."""
    from mlflow.exceptions import MlflowException

    from lm.checkpoint import read_run_record

    run_id = read_run_record(record_dir).get(RUN_ID_FIELD)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning(
            "%s/run.json names MLflow run %s, which this store does not have: new run", record_dir, run_id
        )
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        log.warning(
            "%s/run.json names MLflow run %s, which is deleted or in another experiment: new run",
            record_dir,
            run_id,
        )
        return None
    return run


def _record_run_id(record_dir: str | Path, run_id: str) -> None:
    from lm.checkpoint import read_run_record, update_run_record

    if read_run_record(record_dir).get(RUN_ID_FIELD) != run_id:
        update_run_record(record_dir, **{RUN_ID_FIELD: run_id})


def _system_tags(cfg: ExperimentConfig, pcfg: PlatformConfig, run_dir: str, launcher: str) -> dict[str, str]:
    import torch

    return {
        RUN_DIR_TAG: run_dir,
        "lmlab.experiment": cfg.name,
        "lmlab.launcher": launcher,
        "lmlab.num_workers": str(pcfg.ray.num_workers if launcher == "ray" else 1),
        "lmlab.host": socket.gethostname(),
        "version.python": std_platform.python_version(),
        "version.torch": torch.__version__,
        "version.ray": _version("ray"),
        "version.mlflow": _version("mlflow"),
        "mlflow.source.name": "lm train",
        # `lm job` sets it, so it can find the job's runs (a failed one too) in MLflow afterwards
        **({JOB_TAG: job} if (job := os.environ.get(JOB_ENV)) else {}),
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)  # no import: ray alone costs a second
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _param_value(value: Any) -> str:
    return str(value)[:_PARAM_LIMIT]


def _tag_value(value: Any) -> str:
    return str(value)[:_TAG_LIMIT]


def _one_line(text: str) -> str:
    """The first line of ``text``, plus its last when they differ (a traceback's exception line)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:1000]


def _summary(exc: BaseException) -> str:
    """An exception in one line: its type and the first lines of its message."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {_one_line(message)}" if message else type(exc).__name__


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` MLflow URI; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _existing_store(uri: str) -> MlflowClient:
    db = sqlite_file(uri)
    if db is not None:
        if not db.is_file():
            raise TrackingError(
                f"no MLflow store at {db}: train a model first (lm train experiments/tiny.yaml)"
            )
    return mlflow_client(uri)


def _experiments(client: MlflowClient, name: str | None) -> list[Any]:
    if name is None:
        return [e for e in client.search_experiments() if e.name != "Default" or _has_runs(client, e)]
    found = client.get_experiment_by_name(name)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise TrackingError(f"--experiment {name!r}: no such MLflow experiment (known: {known})")
    return [found]


def _has_runs(client: MlflowClient, experiment: Any) -> bool:
    return bool(client.search_runs([experiment.experiment_id], max_results=1))


def _find_run(client: MlflowClient, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        return client.get_run(run_id)
    ids = [e.experiment_id for e in client.search_experiments()]
    matches = [r for r in client.search_runs(ids, max_results=1000) if r.info.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise TrackingError(
            f"run id prefix {run_id!r} is ambiguous ({len(matches)} runs); give more characters"
        )
    raise TrackingError(f"no MLflow run {run_id!r}; `lm runs list` shows the ids")


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None, depth: int = 0) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir and depth < 3:
            out.extend(_artifact_paths(client, run_id, item.path, depth + 1))
        else:
            out.append(item.path if item.is_dir else f"{item.path} ({item.file_size or 0:,} bytes)")
    return out


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt_num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _fmt_time(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
