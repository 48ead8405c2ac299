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
import importlib.metadata
import json
import logging
import math
import os
import platform as std_platform
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.checkpoint import CONFIG, METRICS, TOKENIZER, WEIGHTS
from lm.config import ExperimentConfig, SampleConfig, dump_config, flatten, to_dict
from lm.train import Hooks
from lmplatform.config import PlatformConfig

if TYPE_CHECKING:  # mlflow costs about a second to import; only the functions that talk to it import it
    from mlflow import MlflowClient

log = logging.getLogger("lmplatform.tracking")

# What a served model needs; trainer.pt (optimizer, RNG) triples the size and nobody serves it.
WEIGHTS_ONLY_FILES = (WEIGHTS, CONFIG, TOKENIZER, METRICS)
BEST_ALIAS = "best"
RUN_DIR_TAG = "lmlab.run_dir"
STEP_TAG = "lmlab.step"  # the final step, so listings need no metric history
_PARAM_LIMIT = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3
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
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        ]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def _connect(self) -> None:
        self._client = mlflow_client(self.uri)


class TrackingHooks(Hooks):
    """lm.train hooks that send train and eval metrics to MLflow (use on rank 0 only)."""

    def __init__(self, logger: MetricLogger) -> None:
        self.logger = logger

    def on_start(self) -> None:
        """Finish opening the store before the training clock starts."""
        self.logger.ready()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """train_loss, lr, tokens_per_s, grad_norm, ... at this step."""
        self.logger.log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """val_loss, val_ppl, val_bpb (and, for the final evaluation, tokens and train_seconds)."""
        self.logger.log(step, metrics)


# --------------------------------------------------------------------------------------------------------------
# Driver side: the run's lifetime, params, artifacts, registry


class RunTracker:
    """The driver's handle on one MLflow run: opened by :meth:`start`, closed by :meth:`track`'s exit."""

    def __init__(self, client: MlflowClient, uri: str, experiment: str, run_id: str, resumed: bool) -> None:
        self.client = client
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self.resumed = resumed
        self.model_version: str | None = None

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
    ) -> RunTracker:
        """Open (or, when ``resume`` and a run for ``run_dir`` exists, reopen) the run and log the config."""
        tc = pcfg.tracking
        assert tc.uri is not None and tc.experiment is not None, "call resolve_platform first"
        client = mlflow_client(tc.uri)
        experiment_id = _experiment_id(client, tc.experiment, tc.artifact_location)
        previous = _run_for_dir(client, experiment_id, run_dir) if resume else None
        if previous is not None:
            client.update_run(previous, status="RUNNING")
            run_id = previous
        else:
            run_name = pcfg.ray.run_name if launcher == "ray" else Path(cfg.train.out_dir).name
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        tracker = cls(client, tc.uri, tc.experiment, run_id, previous is not None)
        tracker._log_start(cfg, pcfg, run_dir, launcher, tokenizer_path)
        return tracker

    @property
    def logger(self) -> MetricLogger:
        """A metric logger for this run that can be shipped to a Ray worker."""
        return MetricLogger(self.uri, self.run_id)

    @property
    def artifact_uri(self) -> str:
        """Root of this run's artifacts."""
        return self.client.get_run(self.run_id).info.artifact_uri

    @contextlib.contextmanager
    def track(self) -> Iterator[RunTracker]:
        """End the run FINISHED on success, KILLED on Ctrl-C and FAILED on any other exception."""
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def _log_start(
        self, cfg: ExperimentConfig, pcfg: PlatformConfig, run_dir: str, launcher: str, tokenizer: Path | None
    ) -> None:
        from mlflow.entities import Param, RunTag

        params = {k: _param_value(v) for k, v in flatten(to_dict(cfg)).items()}
        if launcher == "ray":
            params |= {f"ray.{k}": _param_value(v) for k, v in to_dict(pcfg.ray).items() if k != "address"}
        logged = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        for key, value in changed.items():  # MLflow refuses to overwrite a param of a reopened run
            log.warning(
                "resumed run: %s changed from %s to %s (the param keeps the first value)",
                key,
                logged[key],
                value,
            )
        new_params = [Param(k, v) for k, v in params.items() if k not in logged]
        tags = [RunTag(k, v) for k, v in _system_tags(cfg, pcfg, run_dir, launcher).items()]
        tags += [RunTag(f"lmlab.changed.{k}", f"{logged[k]} -> {v}") for k, v in changed.items()]
        for i in range(0, max(len(new_params), len(tags)), _BATCH_LIMIT):
            self.client.log_batch(
                self.run_id, params=new_params[i : i + _BATCH_LIMIT], tags=tags[i : i + _BATCH_LIMIT]
            )
        self.client.log_text(self.run_id, dump_config(cfg), CONFIG)
        if launcher == "ray":
            self.client.log_text(self.run_id, dump_config(pcfg), "platform.yaml")
        if tokenizer is not None:
            self.client.log_artifact(self.run_id, str(tokenizer))

    def finish(
        self,
        cfg: ExperimentConfig,
        final: Path | None,
        best: Path | None,
        register: bool = True,
    ) -> None:
        """Log weights-only final/best checkpoints, the loss curve and samples; register the best checkpoint."""
        best = best or final
        if final is not None and "step" in (metrics := _read_metrics(final)):
            self.client.set_tag(self.run_id, STEP_TAG, str(int(metrics["step"])))
        with tempfile.TemporaryDirectory(prefix="lmlab-mlflow-") as tmp:
            for name, path in (("final", final), ("best", best)):
                if path is not None:
                    staged = _weights_only_copy(path, Path(tmp) / name)
                    self.client.log_artifacts(self.run_id, str(staged), f"checkpoints/{name}")
            png = Path(tmp) / "loss_curve.png"
            if plot_loss_curve(self.client, self.run_id, png):
                self.client.log_artifact(self.run_id, str(png))
            if best is not None and cfg.sample.num_samples > 0:
                self.client.log_text(self.run_id, format_samples(best, cfg.sample), "samples.txt")
        if register and best is not None:
            self.model_version = self.register_best(best)

    def register_best(self, best: Path) -> str:
        """Add ``best`` (already logged under checkpoints/best) as a model version; move the alias if it wins."""
        from mlflow.exceptions import MlflowException

        name = registered_model_name(self.experiment)
        metrics = _read_metrics(best)
        with contextlib.suppress(MlflowException):  # already registered by an earlier run
            self.client.create_registered_model(
                name, description=f"Best checkpoints of lmlab experiment {self.experiment!r}"
            )
        tags = {k: str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        description = ", ".join(
            f"{label} {metrics[key]:.4g}" for key, label in (("val_ppl", "val ppl"), ("val_bpb", "bits/byte"),
                                                             ("step", "step")) if key in metrics
        )  # fmt: skip
        version = self.client.create_model_version(
            name, source=f"{self.artifact_uri}/checkpoints/best", run_id=self.run_id, tags=tags,
            description=f"{description} (run {self.run_id})",
        )  # fmt: skip
        winner = update_best_alias(self.client, name)
        log.info(
            "registered %s version %s (alias %r -> version %s)", name, version.version, BEST_ALIAS, winner
        )
        return str(version.version)


def update_best_alias(client: MlflowClient, name: str) -> str | None:
    """Point alias ``best`` at the version with the lowest bits per byte (val_loss when bpb is missing).

    Bits per byte, not val_loss, because versions of one experiment may use different tokenizers (a vocab
    override), and nats per token do not compare across tokenizers while bits per byte do.
    """

    def score(version: Any) -> tuple[float, float]:
        tags = version.tags or {}
        bpb, loss = _float(tags.get("val_bpb")), _float(tags.get("val_loss"))
        return (bpb if bpb is not None else math.inf, loss if loss is not None else math.inf)

    versions = [
        v for v in client.search_model_versions(f"name = '{_quote(name)}'") if score(v) != (math.inf,) * 2
    ]
    if not versions:
        return None
    winner = min(versions, key=score)
    client.set_registered_model_alias(name, BEST_ALIAS, winner.version)
    return str(winner.version)


def start_run(
    cfg: ExperimentConfig,
    pcfg: PlatformConfig,
    run_dir: str,
    *,
    launcher: str,
    resume: bool = True,
    tokenizer_path: Path | None = None,
) -> RunTracker | None:
    """:meth:`RunTracker.start`, or None when ``tracking.enabled`` is false."""
    if not pcfg.tracking.enabled:
        return None
    return RunTracker.start(
        cfg, pcfg, run_dir, launcher=launcher, resume=resume, tokenizer_path=tokenizer_path
    )


# --------------------------------------------------------------------------------------------------------------
# Artifacts


def plot_loss_curve(client: MlflowClient, run_id: str, path: Path) -> bool:
    """Plot logged train_loss and val_loss against step into ``path``; False if nothing was logged."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    series = {key: _history(client, run_id, key) for key in ("train_loss", "val_loss")}
    if not any(series.values()):
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "val_loss" else None, markersize=3, label=key)
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
    """A table of runs (newest first): id, name, status, final val ppl and bits/byte, and params that differ."""
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
    header = ["run id", "experiment", "name", "status", "started", "step", "val ppl", "bits/byte", *differing]
    rows = [header]
    for r in runs:
        m = r.data.metrics
        rows.append([
            r.info.run_id, names.get(r.info.experiment_id, "?"), r.info.run_name or "", r.info.status,
            _fmt_time(r.info.start_time), r.data.tags.get(STEP_TAG, "-"),
            _fmt_num(m.get("val_ppl"), "{:.2f}"), _fmt_num(m.get("val_bpb"), "{:.4f}"),
            *(r.data.params.get(k, "-") for k in differing),
        ])  # fmt: skip
    note = f"\n({len(hidden)} more differing params: {', '.join(hidden)})" if hidden else ""
    return _table(rows) + note


def show_run(uri: str, run_id: str) -> str:
    """Everything about one run: status, tags, params, latest metrics, artifacts and model versions."""
    client = _existing_store(uri)
    run = _find_run(client, run_id)
    info, data = run.info, run.data
    experiment = client.get_experiment(info.experiment_id)
    duration = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    lines = [
        f"run {info.run_id}  {info.run_name or ''}",
        f"  experiment  {experiment.name} ({info.experiment_id})",
        f"  status      {info.status}",
        f"  started     {_fmt_time(info.start_time)}"
        + (f"  ({duration:.1f}s)" if duration is not None else ""),
        f"  artifacts   {info.artifact_uri}",
        "tags:",
        *(f"  {k} = {v}" for k, v in sorted(data.tags.items()) if not k.startswith("mlflow.")),
        "metrics (latest value):",
        *(f"  {k} = {v:.6g}" for k, v in sorted(data.metrics.items())),
        "params:",
        *(f"  {k} = {v}" for k, v in sorted(data.params.items())),
        "artifact files:",
        *(f"  {p}" for p in _artifact_paths(client, info.run_id)),
    ]
    versions = client.search_model_versions(f"run_id = '{_quote(info.run_id)}'")
    if versions:
        lines.append("model versions:")
        for found in versions:
            v = client.get_model_version(found.name, found.version)  # search results leave aliases out
            aliases = f" (aliases: {', '.join(v.aliases)})" if v.aliases else ""
            lines.append(f"  models:/{v.name}/{v.version}{aliases}")
    return "\n".join(lines)


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


def _run_for_dir(client: MlflowClient, experiment_id: str, run_dir: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{_quote(run_dir)}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def _system_tags(cfg: ExperimentConfig, pcfg: PlatformConfig, run_dir: str, launcher: str) -> dict[str, str]:
    import torch

    device = "cuda" if (pcfg.ray.use_gpu if launcher == "ray" else torch.cuda.is_available()) else "cpu"
    if launcher != "ray" and cfg.train.device != "auto":
        device = cfg.train.device
    return {
        RUN_DIR_TAG: run_dir,
        "lmlab.experiment": cfg.name,
        "lmlab.launcher": launcher,
        "lmlab.num_workers": str(pcfg.ray.num_workers if launcher == "ray" else 1),
        "lmlab.device": device,
        "lmlab.host": socket.gethostname(),
        "version.python": std_platform.python_version(),
        "version.torch": torch.__version__,
        "version.ray": _version("ray"),
        "version.mlflow": _version("mlflow"),
        "mlflow.source.name": "lm train",
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)  # no import: ray alone costs a second
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _param_value(value: Any) -> str:
    return str(value)[:_PARAM_LIMIT]


def _existing_store(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
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
