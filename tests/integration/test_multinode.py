"""A simulated two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs for workers,
two worker nodes of one CPU each): ``lm train`` with two workers and ``STRICT_SPREAD`` puts one worker on each node,
survives one node being removed mid-run (a real fault; ``ray.max_failures=1``) by resuming on a replacement node,
and lands in one MLflow run on a real ``mlflow server``. With a local SQLite store the same cluster refuses to train.

The cluster lives in this test process without ``ray.init`` (the driver is the ``lm train`` subprocess), under its
own RAY_TMPDIR so a ``ray.init()`` elsewhere on the machine never finds it; it is torn down node by node (not
``Cluster.shutdown``, which resets this process's Ray client state that other test modules' Ray may hold).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import TINY
from tests.integration.servers import MlflowServer

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
STEPS = 150


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[Any, list[Any], dict[str, str]]]:
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="lmray-mn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # A node is declared dead after health_check_failure_threshold missed checks (3 s apart): on a machine this
        # loaded, Ray's default of 5 once declared a live node dead, which spent the run's only restart.
        head_args = {"num_cpus": 0, "_system_config": {"health_check_failure_threshold": 10}}
        c = Cluster(initialize_head=True, connect=False, head_node_args=head_args)
        try:
            nodes = [c.add_node(num_cpus=1) for _ in range(2)]
            c.wait_for_nodes()
            yield c, nodes, env
        finally:
            for node in list(c.worker_nodes):
                c.remove_node(node, allow_graceful=False)
            c.remove_node(c.head_node, allow_graceful=False)
            shutil.rmtree(tmp, ignore_errors=True)


def _lm_train(
    c: Any, env: dict[str, str], tmp_path: Path, corpus_dir: Path, uri: str, *extra: str
) -> subprocess.Popen[str]:
    argv = [
        "nice", "-n", "10", sys.executable, "-m", "lmplatform", "train", "--no-sample",
        str(REPO / "experiments" / "tiny.yaml"), *TINY, "name=twonode", "train.max_seconds=null",
        f"data.corpus={corpus_dir / 'corpus.txt'}", f"data.cache_dir={corpus_dir / 'data'}",
        f"ray.storage_path={tmp_path / 'runs'}", f"ray.address={c.address}", f"tracking.uri={uri}", *extra,
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")} | env
    log = (tmp_path / "train.log").open("w")
    return subprocess.Popen(argv, cwd=tmp_path, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _spread_groups(c: Any) -> dict[str, dict[str, Any]]:
    """The cluster's STRICT_SPREAD placement groups that Ray has placed, by id."""
    table = c.global_state.placement_group_table()
    return {k: v for k, v in table.items() if v["strategy"] == "STRICT_SPREAD" and v["state"] == "CREATED"}


def _wait(what: str, check: Any, proc: subprocess.Popen[str], log: Path, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, (
            f"lm train exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def test_local_store_is_refused_on_several_nodes(two_nodes: Any, tmp_path: Path, corpus_dir: Path) -> None:
    c, _, env = two_nodes
    proc = _lm_train(c, env, tmp_path, corpus_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", "ray.num_workers=2")
    assert proc.wait(timeout=240) == 2
    out = (tmp_path / "train.log").read_text()
    assert "is a local MLflow store, but this Ray cluster has 3 nodes" in out and "make mlflow-server" in out
    assert not list((tmp_path / "runs").glob("*/step-*")), "it trained before refusing"


def test_strict_spread_one_worker_per_node_resumes_after_a_node_dies(
    two_nodes: Any, mlflow_server: MlflowServer, tmp_path: Path, corpus_dir: Path
) -> None:
    from lmplatform.tracking import mlflow_client

    c, (node_a, node_b), env = two_nodes
    log = tmp_path / "train.log"
    proc = _lm_train(
        c, env, tmp_path, corpus_dir, mlflow_server.uri, "ray.num_workers=2", "ray.cpus_per_worker=1",
        "ray.placement_strategy=STRICT_SPREAD", "ray.max_failures=1", f"train.max_steps={STEPS}",
        "train.checkpoint_interval=20", "train.log_interval=10", "train.eval_interval=100",
    )  # fmt: skip
    try:
        first = _wait("the workers' placement", lambda: _spread_groups(c), proc, log)
        ((pg_id, pg),) = first.items()
        nodes = set(pg["bundles_to_node_id"].values())
        assert len(pg["bundles_to_node_id"]) == 2 and nodes == {
            node_a.node_id,
            node_b.node_id,
        }  # one per node
        run_dir = tmp_path / "runs" / "twonode"
        _wait("a first checkpoint", lambda: list(run_dir.glob("step-*")), proc, log)
        c.remove_node(node_b, allow_graceful=False)  # a worker's node dies mid-run
        node_c = c.add_node(num_cpus=1)  # and a replacement joins, as an autoscaler would add one
        second = _wait(
            "the restarted workers' placement", lambda: _spread_groups(c).keys() - {pg_id}, proc, log
        )
        new_nodes = set(_spread_groups(c)[next(iter(second))]["bundles_to_node_id"].values())
        assert new_nodes == {node_a.node_id, node_c.node_id}
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    resumed = int(re.search(r"resumed from step (\d+)", out).group(1))
    assert 20 <= resumed < STEPS
    client = mlflow_client(mlflow_server.uri)
    experiment = client.get_experiment_by_name("twonode")
    (run,) = client.search_runs([experiment.experiment_id])  # both attempts in one MLflow run
    assert run.info.status == "FINISHED" and run.data.tags["lmlab.num_workers"] == "2"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert max(steps) == STEPS and min(steps) == 10
    assert "val_bpb" in run.data.metrics
