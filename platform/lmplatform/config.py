"""Platform config sections (``ray:``, ``tracking:``) read from the same experiment YAML as ``lm``'s.

``lm.config`` ignores these sections; here they become frozen dataclasses, validated with the same
:class:`lm.config.ConfigError` messages (``ray.num_workers=-1 is not allowed: ...``), and their defaults are
resolved to absolute paths and URIs because Ray workers and MLflow run in other directories. ``train.device``
is mapped onto the Ray workers' resources (``cuda`` sets ``ray.use_gpu``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lm.config import (
    PLATFORM_SECTIONS,
    ConfigError,
    ExperimentConfig,
    Section,
    build,
    check,
    check_name,
    read_raw,
    resolve_paths,
)
from lm.precision import PRECISIONS

# Sections this module builds; ``search:`` is a mapping of dotted keys to spaces that lmplatform.tune reads.
_BUILT_SECTIONS = ("ray", "tracking", "tune", "serve")


@dataclass(frozen=True)
class RayConfig(Section):
    """Where and how Ray Train runs the loop: workers, resources, storage, restarts."""

    section: ClassVar[str] = "ray"
    num_workers: int = 1  # 0 = Ray Train local mode: the loop runs in the driver, no worker actors
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when use_gpu
    storage_path: str = "runs"  # a directory (made absolute) or a URI such as s3://bucket/prefix
    run_name: str | None = None  # None: the experiment name
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts; -1 = unlimited
    address: str | None = None  # None: RAY_ADDRESS or a running local head, else start one
    # ddp: every worker holds the whole model and optimizer (DistributedDataParallel); fsdp: parameters,
    # gradients and optimizer state sharded over the workers (FSDP2 fully_shard, sharded DCP checkpoints)
    strategy: str = field(default="ddp", metadata={"choices": ("ddp", "fsdp")})
    # How Ray places the workers' bundles on nodes: PACK (as few nodes as possible), SPREAD (best effort across
    # nodes) or STRICT_SPREAD (one worker per node; waits until that many nodes have room).
    placement_strategy: str = field(default="PACK", metadata={"choices": ("PACK", "SPREAD", "STRICT_SPREAD")})

    def validate(self) -> None:
        check(self.num_workers >= 0, "ray.num_workers", self.num_workers, "must be >= 0 (0 = local mode)")
        check(
            self.num_workers > 0 or self.placement_strategy == "PACK",
            "ray.placement_strategy",
            self.placement_strategy,
            "PACK with ray.num_workers=0 (local mode places no workers); set ray.num_workers >= 1",
        )
        self._positive("cpus_per_worker", "gpus_per_worker", "keep_checkpoints")
        check(
            self.max_failures >= -1,
            "ray.max_failures",
            self.max_failures,
            "must be >= 0, or -1 for unlimited",
        )
        check(bool(self.storage_path), "ray.storage_path", self.storage_path, "a directory or a storage URI")
        if self.run_name is not None:
            check_name(self.run_name, "ray.run_name")
        if self.gpus_per_worker is not None:
            check(self.use_gpu, "ray.gpus_per_worker", self.gpus_per_worker, "needs ray.use_gpu=true")
        if self.strategy == "fsdp":
            check(
                self.num_workers >= 1,
                "ray.strategy",
                self.strategy,
                "needs ray.num_workers >= 1 (0 = local mode)",
            )

    @property
    def is_local_storage(self) -> bool:
        """True when ``storage_path`` is a directory on this machine rather than a URI."""
        return "://" not in self.storage_path

    @property
    def run_dir(self) -> str:
        """Where Ray keeps this run: ``storage_path/run_name``."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"


@dataclass(frozen=True)
class TrackingConfig(Section):
    """MLflow: where runs go, under which experiment, and whether the best checkpoint is registered."""

    section: ClassVar[str] = "tracking"
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:////<repo>/mlflow.db
    artifact_location: str | None = None  # None: file:///<repo>/mlartifacts for a local store
    experiment: str | None = None  # None: the experiment name
    register_model: bool = True

    def validate(self) -> None:
        if self.experiment is not None:
            check_name(self.experiment, "tracking.experiment")


@dataclass(frozen=True)
class TuneConfig(Section):
    """Ray Tune sweeps: how many trials, how many at once, the per-trial budget and the ASHA scheduler."""

    section: ClassVar[str] = "tune"
    # The per-trial budget is the experiment's own train.max_steps / train.max_tokens / train.max_seconds.
    num_samples: int = 1  # samples drawn from the space; a grid is repeated num_samples times
    max_concurrent_trials: int = 1  # Tune does not count the Train workers' CPUs: cap it to what fits
    # minimised; val is reported, never used to decide
    metric: str = field(default="dev_loss", metadata={"choices": ("dev_loss",)})
    # the loop's own counters; seconds (its training clock) is the fair one when sizes compete for a time budget
    time_attr: str = field(default="step", metadata={"choices": ("step", "tokens", "seconds")})
    scheduler: str = field(default="asha", metadata={"choices": ("asha", "fifo")})
    grace_period: int = 100  # asha: time_attr units a trial runs before it can be stopped
    reduction_factor: float = 3.0  # asha: 1/reduction_factor of the trials go on at each rung
    max_t: int | None = None  # asha: None = above the budget's last report (never stops a trial at its end)
    max_failures: int = 0  # retries of a failed trial (it resumes from its checkpoint); -1 = unlimited
    # scaling: lmplatform.scaling.report fits the sweep's results (an iso-time study)
    study: str = field(default="none", metadata={"choices": ("none", "scaling")})
    name: str | None = None  # None: <experiment>-sweep; re-running a sweep of this name resumes it
    storage_path: str | None = None  # None: ray.storage_path; the sweep lives in storage_path/name
    seed: int | None = None  # the search's sampling seed; None: train.seed

    def validate(self) -> None:
        self._positive("num_samples", "max_concurrent_trials", "grace_period", "max_t")
        check(self.reduction_factor > 1, "tune.reduction_factor", self.reduction_factor, "must be > 1")
        check(
            self.max_failures >= -1, "tune.max_failures", self.max_failures, "must be >= 0, or -1: unlimited"
        )
        if self.max_t is not None:
            check(
                self.max_t >= self.grace_period,
                "tune.max_t",
                self.max_t,
                f"must be >= tune.grace_period={self.grace_period}",
            )
        if self.name is not None:
            check_name(self.name, "tune.name")


@dataclass(frozen=True)
class ServeConfig(Section):
    """Ray Serve: host, port, replicas, threads, batching mode and request limits."""

    section: ClassVar[str] = "serve"
    host: str = "127.0.0.1"  # loopback unless named: Serve's own config files default to every interface
    port: int = 8000
    model: str | None = None  # models:/NAME@ALIAS, models:/NAME/VERSION, a run id or a directory; None: @best
    device: str = "cpu"  # cpu | cuda (one GPU per replica) | auto
    precision: str = field(
        default="fp32", metadata={"choices": PRECISIONS}
    )  # lm.precision: fp32 | bf16 | int8
    replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs reserved per replica
    threads: int | None = None  # torch threads per replica; None: max(1, int(num_cpus))
    batching: str = field(default="continuous", metadata={"choices": ("none", "static", "continuous")})
    # direct: the replica serves HTTP itself (Ray Serve's direct ingress), one hop less for every request and
    # stream chunk; proxy: Serve's HTTP proxy in front; auto: direct when lm serve starts its own Ray with one
    # replica, else proxy. See README "Serving under load".
    ingress: str = field(default="auto", metadata={"choices": ("auto", "proxy", "direct")})
    # process: continuous/none batching decodes in a child process of the replica, so HTTP and decoding do not
    # share one GIL; thread: in a thread of the replica; auto: process on the CPU, thread on a GPU. README
    # "Serving under load".
    engine: str = field(default="auto", metadata={"choices": ("auto", "process", "thread")})
    max_batch_size: int = 16  # rows decoded together per replica
    batch_wait_timeout_s: float = 0.01  # static batching: how long a batch waits to fill
    max_prompt_tokens: int | None = None  # None: the model's block_size
    max_new_tokens: int = 1024  # the largest max_tokens / max_new_tokens a request may ask for
    max_n: int = 4  # completions per prompt
    max_stop: int = 4  # stop strings per request
    max_body_bytes: int = 65536  # larger bodies get 413
    max_queued_requests: int = 64  # waiting requests per replica beyond the running batch; then backpressure
    backpressure_status: int = 503  # 503 or 429, with Retry-After
    retry_after_s: int = 1
    api_key: str | None = None  # bearer token; None: $LMLAB_API_KEY, unset = no auth
    app_name: str = "lmlab"
    route_prefix: str = "/"
    pid_file: str = "runs/serve.pid"  # where `lm serve` records itself for `lm serve --stop`
    startup_timeout_s: float = 180.0  # `lm serve` gives up when the replicas are not running by then

    def max_request_rows(self) -> int | None:
        """The most rows (prompts x n) one request may need: what one replica's engine holds at once.

        None for ``batching: static``, whose rows wait in Serve's batch queue without a bound."""
        if self.batching == "static":
            return None
        return (1 if self.batching == "none" else self.max_batch_size) + self.max_queued_requests

    def validate(self) -> None:
        check(bool(self.host) and " " not in self.host, "serve.host", self.host, "an address: 127.0.0.1")
        check(0 < self.port < 65536, "serve.port", self.port, "a TCP port in 1..65535")
        check(self.device in ("cpu", "cuda", "auto"), "serve.device", self.device, "one of cpu, cuda, auto")
        check(
            self.precision != "int8" or self.device == "cpu",
            "serve.precision",
            self.precision,
            f"int8 runs on the CPU only (serve.device={self.device}): use serve.device=cpu, or bf16 on a GPU",
        )
        check(self.num_cpus >= 0, "serve.num_cpus", self.num_cpus, "must be >= 0")
        self._positive(
            "replicas", "threads", "max_batch_size", "max_prompt_tokens", "max_new_tokens", "max_n",
            "max_body_bytes", "max_queued_requests",
        )  # fmt: skip
        wait = self.batch_wait_timeout_s
        check(wait >= 0, "serve.batch_wait_timeout_s", wait, "must be >= 0")
        check(self.max_stop >= 0, "serve.max_stop", self.max_stop, "must be >= 0")
        check(
            self.backpressure_status in (429, 503),
            "serve.backpressure_status",
            self.backpressure_status,
            "503 (Service Unavailable) or 429 (Too Many Requests)",
        )
        check(self.retry_after_s >= 0, "serve.retry_after_s", self.retry_after_s, "must be >= 0 seconds")
        if self.api_key is not None:
            check(len(self.api_key) >= 8, "serve.api_key", "<hidden>", "8 characters or more (null: none)")
        check(self.route_prefix.startswith("/"), "serve.route_prefix", self.route_prefix, "must start with /")
        check_name(self.app_name, "serve.app_name")
        check(self.startup_timeout_s > 0, "serve.startup_timeout_s", self.startup_timeout_s, "must be > 0")
        check(
            self.ingress != "direct" or self.replicas == 1,
            "serve.ingress",
            self.ingress,
            f"direct needs serve.replicas=1 (got {self.replicas}): each replica would listen on a port of its own; "
            "use serve.ingress=proxy (or auto) for several replicas",
        )
        rows = self.max_request_rows()
        check(
            rows is None or self.max_n <= rows,
            "serve.max_n",
            self.max_n,
            f"at most {rows}: one prompt with n=max_n must fit a replica's "
            "serve.max_batch_size + serve.max_queued_requests rows (1 + serve.max_queued_requests with "
            "batching: none)",
        )


@dataclass(frozen=True)
class PlatformConfig:
    """The platform sections of one experiment YAML."""

    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (cwd) holding pyproject.toml, else ``start``."""
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return start


def load_platform_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    base_dir: str | Path | None = None,
) -> tuple[ExperimentConfig, PlatformConfig]:
    """Load the experiment and its platform sections from one YAML plus dotted overrides.

    Relative paths resolve against ``base_dir`` (cwd), defaults that live in the repository (the MLflow store)
    against the repository root found from there.
    """
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd().resolve()
    raw = read_raw(path, overrides)
    lm_part = {k: v for k, v in raw.items() if k not in PLATFORM_SECTIONS}
    cfg = resolve_paths(build(ExperimentConfig, lm_part), base)
    platform_part = {k: raw[k] for k in _BUILT_SECTIONS if k in raw}
    pcfg = build(PlatformConfig, platform_part)
    return cfg, resolve_platform(pcfg, cfg, base)


def resolve_platform(pcfg: PlatformConfig, cfg: ExperimentConfig, base: Path) -> PlatformConfig:
    """Fill defaults that depend on the experiment and make every path and URI absolute."""
    ray = pcfg.ray
    storage = ray.storage_path
    if ray.is_local_storage:  # Ray's controller crashes on a relative storage_path
        storage = str((base / Path(storage).expanduser()).resolve())
    ray = dataclasses.replace(ray, storage_path=storage, run_name=ray.run_name or cfg.name)
    ray = _ray_device(ray, cfg.train.device)
    unshardable = cfg.optim.unshardable() if ray.strategy == "fsdp" else None
    if unshardable:
        raise ConfigError(f"ray.strategy=fsdp does not support {unshardable}, or use ray.strategy=ddp")

    tr = pcfg.tracking
    repo = find_repo_root(base)
    uri = tr.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"
    uri = _absolute_uri(uri, base)
    artifacts = tr.artifact_location
    if artifacts is None and _is_local_store(uri):
        artifacts = (repo / "mlartifacts").as_uri()
    elif artifacts is not None and "://" not in artifacts:
        artifacts = (base / Path(artifacts).expanduser()).resolve().as_uri()
    tr = dataclasses.replace(tr, uri=uri, artifact_location=artifacts, experiment=tr.experiment or cfg.name)
    return dataclasses.replace(pcfg, ray=ray, tracking=tr)


def _ray_device(ray: RayConfig, device: str) -> RayConfig:
    """Map ``train.device`` onto the Ray workers' resources, so a run never records a device it did not use.

    ``cuda`` asks Ray for one GPU per worker (``ray.use_gpu``); Ray then hands each worker its own GPU, so a
    device index (``cuda:1``) cannot apply; ``cpu``/``mps`` with ``ray.use_gpu=true`` contradict each other.
    """
    kind = device.split(":")[0]
    if kind == "cuda":
        if device != "cuda":
            raise ConfigError(
                f"train.device={device!r} is not allowed under Ray: Ray gives each worker its own GPU; use "
                "train.device=cuda (or --local to pick a GPU by index)"
            )
        return dataclasses.replace(ray, use_gpu=True)
    if kind in ("cpu", "mps") and ray.use_gpu:
        raise ConfigError(
            f"train.device={device!r} contradicts ray.use_gpu=true: use train.device=auto or cuda with GPUs, "
            "or drop ray.use_gpu"
        )
    return ray


def _absolute_uri(uri: str, base: Path) -> str:
    """``sqlite:///rel.db`` and bare paths become absolute: MLflow resolves them against each process's cwd."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if db and not db.startswith("/") and db != ":memory:":
            return f"sqlite:///{(base / db).resolve()}"
        return uri
    if "://" not in uri:
        if uri.startswith("databricks"):
            return uri
        raise ConfigError(
            f"tracking.uri={uri!r} is not allowed: a URI such as sqlite:////abs/mlflow.db or http://host:5000 "
            "(MLflow 3 refuses a plain directory store)"
        )
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))
