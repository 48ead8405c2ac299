"""Past one machine: a real Ray head (``lm cluster up/down``), jobs on it (``lm job train|sweep``), a shared MLflow
tracking server (``lm mlflow-server``) and the checks a run on several nodes needs.

- ``lm cluster up`` runs ``ray start --head`` with this checkout's virtual environment first on the head's PATH (a
  job's ``python`` is the head's), token authentication on with a token of its own (``runs/cluster/auth_token``),
  loopback addresses and a private ``--temp-dir``, so a ``ray.init()`` elsewhere on the machine never joins it
  by accident. It records what it started in ``runs/cluster/head.json``; ``lm cluster down`` stops exactly
  those processes (the session's, found by its temp dir), never another Ray on the machine as ``ray stop`` would.
- ``lm job train|sweep`` submits ``python -m lmplatform train|sweep`` with ``--working-dir .`` semantics (the
  checkout less its git-ignored files), ``lm`` and ``lmplatform`` as ``py_modules`` and ``MLFLOW_TRACKING_URI`` in
  the job's environment, follows the logs and prints the job's status and MLflow runs. The head is
  ``RAY_ADDRESS`` when set, else the one ``lm cluster up`` recorded.
- A run on more than one node refuses a local MLflow store (SQLite file or directory) before it trains: each node
  would write its own file. ``lm mlflow-server`` is the server they share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmplatform.config import RayConfig, TrackingConfig, find_repo_root
from lmplatform.train import PlatformError

log = logging.getLogger("lmplatform.cluster")
CLUSTER_DIR_ENV = "LMLAB_CLUSTER_DIR"  # where `lm cluster up` records its head (default: <repo>/runs/cluster)
RECORD = "head.json"
TOKEN = "auth_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Besides git-ignored files: a clone's history (Ray 2.60 skips .git by default; said here so every version does).
UPLOAD_EXCLUDES = [".git"]
_RUN_ID = re.compile(r"mlflow: (?:parent )?run ([0-9a-f]{32})")


class ClusterError(PlatformError):
    """A head cannot be started, found or stopped, or a job cannot be submitted as asked."""


# --------------------------------------------------------------------------------------------------------------
# Checks for runs on a cluster of several nodes


def is_local_store(uri: str | None) -> bool:
    """True for an MLflow store that lives in one machine's filesystem (SQLite file, file:/ directory)."""
    return bool(uri) and str(uri).startswith(("sqlite:", "file:", "/"))


def check_cluster(rc: RayConfig, tracking_uri: str | None, nodes: list[dict[str, Any]], fixed: bool) -> None:
    """Refuse what cannot work on these Ray ``nodes`` before anything trains.

    - more than one node and a local MLflow store: rank 0 (or a sweep trial) may run on another node and open
      another file, so the run would be split or lost: use a tracking server;
    - ``STRICT_SPREAD`` with fewer nodes that can hold a worker than ``ray.num_workers``: Ray would wait forever
      (an error on a cluster this process started, a warning on one that may grow);
    - a local ``ray.storage_path`` on several nodes must be one shared filesystem (a warning: it may be NFS).
    """
    if len(nodes) > 1 and is_local_store(tracking_uri):
        raise ClusterError(
            f"tracking.uri={tracking_uri} is a local MLflow store, but this Ray cluster has {len(nodes)} nodes: "
            "workers on other nodes would write to files of their own. Use a tracking server: "
            "`make mlflow-server` (lm mlflow-server) and MLFLOW_TRACKING_URI=http://<host>:5000"
        )
    if rc.num_workers > 0 and rc.placement_strategy == "STRICT_SPREAD":
        need = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker or 1.0} if rc.use_gpu else {})}
        fit = sum(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items()) for n in nodes)
        if fit < rc.num_workers:
            message = (
                f"ray.placement_strategy=STRICT_SPREAD puts each of ray.num_workers={rc.num_workers} workers on a "
                f"node of its own, but only {fit} of the cluster's {len(nodes)} nodes can hold one worker "
                f"({', '.join(f'{v:g} {k}' for k, v in need.items())})"
            )
            if fixed:
                raise ClusterError(f"{message}; use PACK or SPREAD, or fewer workers")
            log.warning("%s; Ray Train will wait until the cluster grows", message)
    if len(nodes) > 1 and rc.is_local_storage:
        log.warning(
            "ray.storage_path=%s is a local path on a %d-node cluster: it must be one filesystem mounted at "
            "the same path on every node (NFS), or use s3://bucket/prefix",
            rc.storage_path,
            len(nodes),
        )


def local_tracking_node(tracking: TrackingConfig) -> str | None:
    """The Ray node id of this driver when the MLflow store is local to it (None: a server, or no tracking)."""
    if not tracking.enabled or not is_local_store(tracking.uri):
        return None
    import ray

    return ray.get_runtime_context().get_node_id()


def check_tracking_node(tracking_node: str | None, uri: str) -> None:
    """On rank 0, before training: a local MLflow store is only reachable on the driver's node (a cluster that
    grew after the driver's check puts workers elsewhere)."""
    if tracking_node is None:
        return
    import ray

    here = ray.get_runtime_context().get_node_id()
    if here != tracking_node:
        raise ClusterError(
            f"tracking.uri={uri} is a local MLflow store on the driver's node, but rank 0 runs on another node "
            f"({here[:12]}): use a tracking server (make mlflow-server; MLFLOW_TRACKING_URI=http://<host>:5000)"
        )


# --------------------------------------------------------------------------------------------------------------
# lm cluster up / down: a local head that records what it started


@dataclass(frozen=True)
class HeadRecord:
    """What ``lm cluster up`` started: addresses, the token file and the session's processes."""

    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_path: str
    pids: list[int]  # at start-up, for the record; `down` finds the session's processes again by temp_dir
    python: str
    ray_version: str

    @property
    def gcs_port(self) -> int:
        """The GCS port: the cluster address's port."""
        return int(self.gcs_address.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        """What a client of this head needs, the documented way: the address, token mode and the token file."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }


def cluster_dir() -> Path:
    """Where the head is recorded: ``$LMLAB_CLUSTER_DIR``, else ``<repo>/runs/cluster`` (git-ignored)."""
    where = os.environ.get(CLUSTER_DIR_ENV)
    return Path(where).expanduser().resolve() if where else find_repo_root() / "runs" / "cluster"


def read_head(directory: Path | None = None) -> HeadRecord | None:
    """The recorded head, or None when ``lm cluster up`` has not run (or ``down`` removed it)."""
    path = (directory or cluster_dir()) / RECORD
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return HeadRecord(**data)


def session_processes(temp_dir: str, gcs_port: int | None = None) -> list[int]:
    """The pids of every live process of the Ray session under ``temp_dir``: those whose command line names it
    (GCS, raylet, dashboard, agents, log monitor) or, with ``gcs_port``, the session's GCS address (the Ray client
    server names only that), and their descendants (workers and job drivers, which rename themselves). ``ps``
    (Linux and macOS) instead of psutil, which Ray no longer installs."""
    gcs = re.compile(rf"--(?:gcs-)?address=\S+:{gcs_port}(?!\d)") if gcs_port else None
    out = subprocess.run(
        ["ps", "-A", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    )
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for line in out.stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
            continue
        pid, ppid = int(fields[0]), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        if len(fields) == 3 and (temp_dir in fields[2] or (gcs is not None and gcs.search(fields[2]))):
            found.add(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return sorted(found)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def cluster_up(
    directory: Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 6379,
    dashboard_port: int = 8265,
    client_port: int = 10001,
    agent_port: int = 52365,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    timeout: float = 180.0,
    print_fn: Callable[..., None] = print,
) -> HeadRecord:
    """Start a Ray head on this machine with token auth, record it, print its addresses (see module docstring)."""
    import ray

    directory = directory or cluster_dir()
    directory.mkdir(parents=True, exist_ok=True)
    previous = read_head(directory)
    if previous is not None:
        if session_processes(previous.temp_dir, previous.gcs_port):
            raise ClusterError(
                f"a head started from here is already running at {previous.gcs_address} (dashboard "
                f"{previous.dashboard_url}); stop it first with `make cluster-down` (lm cluster down)"
            )
        _forget(directory, previous)  # a stale record: its processes are gone
    ports = {"--port": port, "--dashboard-port": dashboard_port, "--ray-client-server-port": client_port,
             "--dashboard-agent-listen-port": agent_port}  # fmt: skip
    for flag, value in ports.items():
        if not _port_free(host, value):
            raise ClusterError(
                f"{flag}={value} on {host} is in use (another Ray head?): pass lm cluster up {flag} N "
                "(make cluster-up ARGS='...')"
            )
    token = directory / TOKEN
    token.write_text(secrets.token_hex(32))  # a token per head; clients read it through RAY_AUTH_TOKEN_PATH
    token.chmod(0o600)
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes: a short path in /tmp.
    temp_dir = tempfile.mkdtemp(prefix="lmray-", dir="/tmp" if Path("/tmp").is_dir() else None)
    bin_dir = Path(sys.executable).parent  # this checkout's venv: the head's (and every job's) python
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token)}  # fmt: skip
    env.setdefault("RAY_worker_niceness", "0")  # workers at this command's priority: normal_worker_priority
    cmd = [str(bin_dir / "ray"), "start", "--head", f"--node-ip-address={host}", f"--dashboard-host={host}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    print_fn(f"starting a Ray head: {shlex.join(cmd)}", flush=True)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        _stop(session_processes(temp_dir, port))
        _remove_tree(temp_dir)
        why = "timed out" if done is None else f"exit {done.returncode}"
        tail = "" if done is None else "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ClusterError(f"ray start --head failed ({why}):\n{tail}")
    pids = session_processes(temp_dir, port)
    record = HeadRecord(
        gcs_address=f"{_url_host(host)}:{port}",
        dashboard_url=f"http://{_url_host(host)}:{dashboard_port}",
        temp_dir=temp_dir,
        token_path=str(token),
        pids=pids,
        python=str(bin_dir / "python"),
        ray_version=ray.__version__,
    )
    (directory / RECORD).write_text(json.dumps(dataclasses.asdict(record), indent=1))
    print_fn(
        f"Ray {record.ray_version} head up (token auth on; {len(record.pids)} processes, recorded in "
        f"{directory / RECORD})\n"
        f"  cluster address: {record.gcs_address}\n"
        f"  dashboard and job API: {record.dashboard_url}\n"
        f"  jobs run with {record.python}\n"
        f"  submit: make job (lm job train EXP) / make job-sweep; they find this head (RAY_ADDRESS overrides)\n"
        f"  the ray CLI: export RAY_ADDRESS={record.dashboard_url} RAY_AUTH_MODE=token "
        f"RAY_AUTH_TOKEN_PATH={record.token_path}\n"
        f"  stop it: make cluster-down (lm cluster down), which stops only this head",
        flush=True,
    )
    return record


def cluster_down(directory: Path | None = None, print_fn: Callable[..., None] = print) -> int:
    """Stop the processes of the head ``lm cluster up`` recorded (and nothing else); forget the record."""
    directory = directory or cluster_dir()
    record = read_head(directory)
    if record is None:
        print_fn(f"no head recorded in {directory / RECORD}: nothing to stop")
        return 0
    stopped = _stop(session_processes(record.temp_dir, record.gcs_port))
    _forget(directory, record)
    print_fn(
        f"stopped the Ray head at {record.gcs_address}: {stopped} processes of session {record.temp_dir}"
    )
    return 0


def _stop(pids: list[int], grace: float = 10.0) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left; how many there were."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie child of ours counts as gone once reaped)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget(directory: Path, record: HeadRecord) -> None:
    (directory / RECORD).unlink(missing_ok=True)
    _remove_tree(record.temp_dir)


def _remove_tree(path: str) -> None:
    import shutil

    if Path(path).name.startswith("lmray-"):  # only a temp dir cluster_up made
        shutil.rmtree(path, ignore_errors=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------------------------------------
# lm job train|sweep


@dataclass(frozen=True)
class JobPlan:
    """One submission: where to, the entrypoint, the runtime env and the MLflow store to look in afterwards."""

    address: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    tracking_uri: str | None
    client_env: dict[str, str]  # what this process needs to reach the head (auth), from the head record


def plan_job(
    verb: str,
    config: str,
    overrides: list[str],
    *,
    storage: str | None = None,
    data_dir: str | None = None,
    repo: Path | None = None,
) -> JobPlan:
    """Decide where a job goes and what it runs; refuse what cannot work on that cluster before submitting."""
    from lmplatform.tracking import JOB_ENV

    repo = repo or find_repo_root()
    record = read_head() if not os.environ.get("RAY_ADDRESS") else None
    address = os.environ.get("RAY_ADDRESS") or (record.dashboard_url if record is not None else None)
    if address is None:
        raise ClusterError(
            "no Ray cluster to submit to: start one here with `make cluster-up` (lm cluster up), or set "
            "RAY_ADDRESS=http://<head>:8265 (plus RAY_AUTH_MODE=token and the token) for another one"
        )
    on_this_machine = record is not None or _is_loopback(address)
    given = {o.split("=", 1)[0] for o in overrides if "=" in o}
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    extra: list[str] = []
    if (
        on_this_machine
    ):  # the head sees this checkout: its runs, token cache and MLflow store are the defaults
        storage = storage or str(repo / "runs")
        data_dir = data_dir or str(repo / "data")
        if tracking is None and "tracking.uri" not in given:
            tracking = f"sqlite:///{repo / 'mlflow.db'}"
            if "tracking.artifact_location" not in given:
                extra.append(f"tracking.artifact_location={repo / 'mlartifacts'}")
    else:
        if storage is None and "ray.storage_path" not in given:
            raise ClusterError(
                f"a job on the cluster at {address} needs storage every node shares for its checkpoints: "
                "--storage s3://bucket/runs (or an NFS path mounted on every node)"
            )
        if (tracking is None or is_local_store(tracking)) and "tracking.uri" not in given:
            raise ClusterError(
                f"a job on the cluster at {address} needs an MLflow tracking server, not a local store: "
                "export MLFLOW_TRACKING_URI=http://<host>:5000 (make mlflow-server on a machine the cluster reaches)"
            )
    if storage:
        extra.append(f"ray.storage_path={storage}")
    if data_dir:
        extra.append(f"data.cache_dir={data_dir}")
    path = Path(config)
    if path.is_absolute() and path.resolve().is_relative_to(repo):
        config = str(path.resolve().relative_to(repo))  # the job's cwd is the uploaded checkout
    elif not path.is_absolute() and not (repo / path).is_file():
        raise ClusterError(f"{config}: no such file in {repo} (the job runs from an upload of this checkout)")
    submission_id = f"lmlab-{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    env_vars = {JOB_ENV: submission_id, "PYTHONUNBUFFERED": "1", "THP_MEM_ALLOC_ENABLE": "1"}
    if tracking:
        env_vars["MLFLOW_TRACKING_URI"] = tracking  # every process of the job logs there
    if record is not None:
        # Ray Train's controller asks the state API for "the" local Ray: on a machine with several (other
        # users' heads, tests), that lookup fails; name this head's dashboard.
        env_vars["RAY_API_SERVER_ADDRESS"] = record.dashboard_url
    entrypoint = shlex.join(["python", "-m", "lmplatform", verb, config, *extra, *overrides])
    runtime_env = {
        "working_dir": str(repo),  # uploaded less git-ignored files (runs/, data/, mlflow.db, .venv, ...)
        "py_modules": [str(repo / "lm"), str(repo / "platform" / "lmplatform")],  # platform/ is no package
        "excludes": UPLOAD_EXCLUDES,
        "env_vars": env_vars,
    }
    return JobPlan(address, entrypoint, runtime_env, submission_id, tracking, record.env() if record else {})


def upload_size(path: Path) -> int:
    """Bytes of the zip Ray uploads for ``path`` as a working_dir or py_module (git-ignored files left out)."""
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory(prefix="lmlab-pkg-") as tmp:
        target = Path(tmp) / "package.zip"
        create_package(str(path), target, include_gitignore=True, excludes=UPLOAD_EXCLUDES, logger=log)
        return target.stat().st_size


def job_command(
    verb: str,
    config: str,
    overrides: list[str],
    *,
    storage: str | None = None,
    data_dir: str | None = None,
    follow: bool = True,
    print_fn: Callable[..., None] = print,
) -> int:
    """``lm job train|sweep``: submit, follow the logs, print the status and the job's MLflow runs; exit 0 only
    when the job SUCCEEDED."""
    plan = plan_job(verb, config, overrides, storage=storage, data_dir=data_dir)
    # The recorded head wants its token, the documented way (token mode + the token file), set before Ray reads
    # them; with RAY_ADDRESS set, the caller's own RAY_AUTH_* settings are used as they are.
    os.environ.update(plan.client_env)
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(plan.address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = " (is the head still up? lm cluster status)" if plan.client_env else ""
        raise ClusterError(
            f"cannot reach the Ray job API at {plan.address}{hint}: {_first_line(exc)}"
        ) from None
    job_id = client.submit_job(
        entrypoint=plan.entrypoint, runtime_env=plan.runtime_env, submission_id=plan.submission_id
    )
    sizes = [
        upload_size(Path(plan.runtime_env["working_dir"])),
        *map(upload_size, map(Path, plan.runtime_env["py_modules"])),
    ]
    print_fn(
        f"submitted job {job_id} to {plan.address} (uploaded {sum(sizes) / 2**20:.1f} MiB: working dir "
        f"{sizes[0] / 2**20:.1f} MiB, less git-ignored files)\n  {plan.entrypoint}",
        flush=True,
    )
    if not follow:
        print_fn(f"  follow it: ray job logs -f {job_id}; stop it: ray job stop {job_id}")
        return 0
    lines: list[str] = []
    try:
        asyncio.run(_tail(client, job_id, lines))
    except KeyboardInterrupt:
        print_fn(f"\nstopped following; the job keeps running (ray job stop {job_id} stops it)")
        return 130
    status = _final_status(client, job_id)
    info = client.get_job_info(job_id)
    print_fn(f"job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        print_fn(f"  error: {_first_line(info.message or info.error_type or 'no message')}")
        errors = [line for line in lines if re.search(r"(Error|error)\b", line)]
        if errors:
            print_fn(f"  last error line: {errors[-1].strip()}")
    _print_runs(plan, "".join(lines), print_fn)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _tail(client: Any, job_id: str, lines: list[str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        lines.append(chunk)


def _final_status(client: Any, job_id: str, timeout: float = 30.0) -> Any:
    """The job's status once terminal (the log stream may close a moment before the status is written)."""
    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status


def _print_runs(plan: JobPlan, logs: str, print_fn: Callable[..., None]) -> None:
    """The job's MLflow runs (tagged with its submission id, or named in its logs) with their status."""
    from lmplatform.tracking import JOB_TAG

    named = list(dict.fromkeys(_RUN_ID.findall(logs)))
    if not plan.tracking_uri:
        for run_id in named:
            print_fn(f"mlflow: run {run_id}")
        return
    try:
        from lmplatform.tracking import mlflow_client

        client = mlflow_client(plan.tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        tagged = client.search_runs(ids, f"tags.`{JOB_TAG}` = '{plan.submission_id}'") if ids else []
        runs = {r.info.run_id: r for r in tagged}
        for run_id in named:
            if run_id not in runs:
                runs[run_id] = client.get_run(run_id)
    except Exception as exc:  # the store may not be reachable from here; the logs still name the runs
        print_fn(
            f"mlflow: cannot read {plan.tracking_uri} from here ({_first_line(exc)}); runs named: {named}"
        )
        return
    if not runs:
        print_fn(f"mlflow: no run of this job in {plan.tracking_uri} (it failed before opening one)")
    for run in runs.values():
        failure = run.data.tags.get("lmlab.failure")
        print_fn(
            f"mlflow: run {run.info.run_id} ({run.info.run_name}) {run.info.status}"
            + (f": {failure}" if failure else "")
            + f" at {plan.tracking_uri}"
        )


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# lm mlflow-server


def allowed_hosts(host: str, names: Iterable[str] = ()) -> list[str] | None:
    """The Host headers ``mlflow server`` should accept; None: MLflow's default (localhost and private IPs).

    MLflow 3 answers 403 to any other Host header, such as a cluster DNS name (``mlflow.lmlab.svc``), and an
    ``--allowed-hosts`` list replaces its default, so the list keeps the default and adds this machine's names
    and ``names``, each with any port (the header carries one).
    """
    if host in LOOPBACK and not names:
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    extra = [n for n in names if n]
    if host not in LOOPBACK:
        extra += [socket.gethostname(), socket.getfqdn()]
        if host not in ("0.0.0.0", "::"):
            extra.append(host)
    out = list(get_default_allowed_hosts())
    for name in dict.fromkeys(extra):
        out += [name, f"{name}:*"] if ":" not in name else [name]
    return list(dict.fromkeys(out))


def mlflow_server_argv(
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    allowed: Iterable[str] = (),
    workers: int | None = None,
    repo: Path | None = None,
) -> list[str]:
    """``mlflow server`` for lmlab: the checkout's SQLite store by default (one machine), artifacts proxied to a
    shared path or s3:// URI, bound to ``host`` with the Host-header allow list that goes with it."""
    repo = repo or find_repo_root()
    backend = backend_store_uri or f"sqlite:///{repo / 'mlflow.db'}"
    artifacts = artifacts_destination or str(repo / "mlartifacts")
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", artifacts]  # fmt: skip
    # SQLite takes one writer at a time (20 s lock timeout): one worker; PostgreSQL takes MLflow's default 4.
    workers = workers or (1 if backend.startswith("sqlite:") else None)
    if workers:
        argv += ["--workers", str(workers)]
    hosts = allowed_hosts(host, allowed)
    if hosts is not None:
        argv += ["--allowed-hosts", ",".join(hosts)]
    return argv


def mlflow_server_command(args: argparse.Namespace) -> int:
    """``lm mlflow-server``: run ``mlflow server`` in the foreground until Ctrl-C."""
    argv = mlflow_server_argv(
        host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination, allowed=args.allowed_hosts or (), workers=args.workers,
    )  # fmt: skip
    shown = "0.0.0.0" if args.host in ("0.0.0.0", "::") else args.host
    where = socket.gethostname() if shown == "0.0.0.0" else _url_host(shown)
    print(f"MLflow tracking server: export MLFLOW_TRACKING_URI=http://{where}:{args.port}", flush=True)
    print(f"  {shlex.join(argv)}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.call(argv)
    return 130


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``lm cluster up|down|status``, ``lm job train|sweep`` and ``lm mlflow-server``."""
    p = sub.add_parser("cluster", help="a Ray head on this machine with token auth (make cluster-up / -down)")
    actions = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="ray start --head with this checkout's venv, token auth and a record")
    up.add_argument("--host", default="127.0.0.1", help="node IP and dashboard interface (default: loopback)")
    up.add_argument("--port", type=int, default=6379, help="GCS port (the cluster address)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API port")
    up.add_argument("--ray-client-server-port", type=int, default=10001)
    up.add_argument("--dashboard-agent-listen-port", type=int, default=52365)
    up.add_argument("--num-cpus", type=int, help="logical CPUs of the head (default: all cores)")
    up.add_argument("--num-gpus", type=int, help="GPUs of the head (default: detected)")
    up.set_defaults(handler=_cmd_up)
    down = actions.add_parser("down", help="stop the head `lm cluster up` started, and only it")
    down.set_defaults(handler=lambda args: cluster_down())
    status = actions.add_parser("status", help="the recorded head and whether it is running")
    status.set_defaults(handler=_cmd_status)

    p = sub.add_parser(
        "job", help="submit a training or a sweep to a Ray cluster as a job (make job / job-sweep)"
    )
    verbs = p.add_subparsers(dest="job_command", required=True, metavar="VERB")
    for verb, what in (("train", "an experiment YAML"), ("sweep", "a sweep YAML")):
        q = verbs.add_parser(verb, help=f"lm {verb} CONFIG as a Ray job on RAY_ADDRESS or the recorded head")
        q.add_argument("config", metavar="CONFIG", help=what)
        q.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. ray.num_workers=2")
        q.add_argument(
            "--storage", help="ray.storage_path for the job (s3://... or a shared path on a cluster)"
        )
        q.add_argument("--data", help="data.cache_dir for the job (the token cache; shared on a cluster)")
        q.add_argument(
            "--no-follow", action="store_true", help="submit and return without following the logs"
        )
        q.set_defaults(handler=_cmd_job, verb=verb)

    p = sub.add_parser("mlflow-server", help="a shared MLflow tracking server (make mlflow-server)")
    p.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: reachable by a cluster)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument(
        "--backend-store-uri", help="default: this checkout's sqlite mlflow.db; postgresql://... shared"
    )
    p.add_argument(
        "--artifacts-destination", help="default: ./mlartifacts; a shared path or s3://bucket/prefix"
    )
    p.add_argument(
        "--allowed-hosts", nargs="*", metavar="NAME",
        help="extra Host header names clients use (e.g. mlflow.lmlab.svc.cluster.local), beyond localhost, "
        "private IPs and this machine's names",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, help="server worker processes (default: 1 for SQLite, else MLflow's)"
    )
    p.set_defaults(handler=mlflow_server_command)


def _cmd_up(args: argparse.Namespace) -> int:
    cluster_up(
        host=args.host, port=args.port, dashboard_port=args.dashboard_port, client_port=args.ray_client_server_port,
        agent_port=args.dashboard_agent_listen_port, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
    )  # fmt: skip
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    record = read_head()
    if record is None:
        print(f"no head recorded in {cluster_dir() / RECORD}")
        return 1
    alive = session_processes(record.temp_dir, record.gcs_port)
    state = f"running ({len(alive)} processes)" if alive else "not running (stale record)"
    print(f"Ray head at {record.gcs_address}, dashboard {record.dashboard_url}: {state}")
    return 0 if alive else 1


def _cmd_job(args: argparse.Namespace) -> int:
    return job_command(
        args.verb, args.config, list(args.overrides), storage=args.storage, data_dir=args.data,
        follow=not args.no_follow,
    )  # fmt: skip
