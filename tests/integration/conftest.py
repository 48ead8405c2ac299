"""Integration fixtures: one real local Ray per session, a real MLflow SQLite store per test, a toy experiment.

The toy experiment (40 KB of Shakespeare, a 300-token tokenizer, a 22K-parameter model, 20 steps) trains in well
under a second, so what a test pays for is Ray and MLflow, which is what these tests are about.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lmplatform.config import PlatformConfig, load_platform_config

from lm.config import ExperimentConfig

TINY = [
    "name=itest",
    "model.vocab_size=300",
    "model.block_size=32",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "optim.warmup_steps=2",
    "train.batch_size=8",
    "train.max_steps=20",
    "train.log_interval=1",
    "train.eval_interval=10",
    "train.eval_max_batches=2",
    "train.checkpoint_interval=10",
    "train.device=cpu",
    "train.amp=off",  # fp32 on every machine (auto picks bf16 on CPUs that have it)
    "sample.max_new_tokens=16",
    "ray.num_workers=0",
]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A fresh local Ray with 2 CPUs for the whole session (never someone else's running head)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
    )
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An absolute SQLite MLflow URI in this test's temp dir (also exported, so defaults point at it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    """A folder with the toy corpus and a token cache shared by every test (the tokenizer is trained once)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text(small_text)
    return root


@pytest.fixture
def tiny_overrides(corpus_dir: Path, tmp_path: Path, mlflow_store: str) -> list[str]:
    """Dotted overrides for the toy experiment, with run storage and MLflow artifacts under tmp_path."""
    return [
        *TINY,
        f"data.corpus={corpus_dir / 'corpus.txt'}",
        f"data.cache_dir={corpus_dir / 'data'}",
        f"train.out_dir={tmp_path / 'local-run'}",
        f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_store}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
    ]


@pytest.fixture
def make_config(
    tiny_overrides: list[str], tmp_path: Path
) -> Callable[..., tuple[ExperimentConfig, PlatformConfig]]:
    """Build (cfg, pcfg) for the toy experiment plus extra overrides."""

    def make(*extra: str) -> tuple[ExperimentConfig, PlatformConfig]:
        return load_platform_config(None, [*tiny_overrides, *extra], base_dir=tmp_path)

    return make


# What a registered test checkpoint reports: dev and val numbers that look like a finished run's.
FINISHED_METRICS = {"step": 10, "dev_loss": 4.5, "dev_ppl": 20.0, "dev_bpb": 2.25, "val_loss": 5.0,
                    "val_ppl": 30.125, "val_bpb": 2.5}  # fmt: skip


def register_random_model(
    cfg: ExperimentConfig, pcfg: PlatformConfig, run_dir: Path, tokenizer: Path, seed: int
) -> tuple[Any, Path]:
    """A seeded random model saved as ``run_dir/best`` and registered the way `make train` does (version 1 on a
    fresh store): the tracker and the checkpoint."""
    import torch
    from lmplatform.tracking import start_run

    from lm.checkpoint import save_checkpoint
    from lm.model import TransformerLM

    torch.manual_seed(seed)
    best = save_checkpoint(run_dir / "best", TransformerLM(cfg.model), cfg, tokenizer, FINISHED_METRICS)
    tracker = start_run(cfg, pcfg, str(run_dir), launcher="local")
    assert tracker is not None
    with tracker.track():
        tracker.finish(cfg, best, best, trained_steps=10)
    return tracker, best


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[Any]:
    """An httpx client on the module's ``server`` fixture (a Serve app's base URL)."""
    import httpx

    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now (servers under test never assume 8000 is free)."""
    from lmplatform.serve import free_port as free_port_at

    return free_port_at("127.0.0.1")


def listener_of(port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` listens on TCP ``port`` (IPv4), from /proc/net/tcp and the processes' socket fds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def nice_of(pid: int) -> int:
    """A process's nice value, from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real ``mlflow server`` process (as ``lm mlflow-server`` runs it) on 127.0.0.1 for the session: it costs
    10-30 s to start. It allows the extra Host name ``mlflow.lmlab.svc``; a test may kill and restart it."""
    from tests.integration.servers import running_mlflow_server

    with running_mlflow_server(
        tmp_path_factory.mktemp("mlflow-server"), free_port(), ("mlflow.lmlab.svc",)
    ) as s:
        yield s
