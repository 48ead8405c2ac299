"""`ray job submit` against a real Ray head started the way `make cluster-up` starts it (lmplatform.cluster.cluster_up:
token auth on, its own temp dir and ports, so it cannot meet another Ray on this machine), found by `lm job` through
its record with no RAY_ADDRESS set: a short training completes and its MLflow run exists; a failing job is reported
FAILED with its error; `cluster_down` stops exactly the head's processes."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lmplatform import cluster

from tests.integration.conftest import TINY, free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.HeadRecord]:
    directory = tmp_path_factory.mktemp("cluster")
    record, ports = None, []
    try:
        ports = [free_port() for _ in range(4)]
        record = cluster.cluster_up(
            directory,
            port=ports[0],
            dashboard_port=ports[1],
            client_port=ports[2],
            agent_port=ports[3],
            num_cpus=2,
        )
        yield record
    finally:
        cluster.cluster_down(directory)
        if record is not None:
            left = cluster.session_processes(record.temp_dir, record.gcs_port)
            assert left == [], f"cluster_down left processes of the head: {left}"
            assert not Path(record.temp_dir).exists()
            for port in ports:  # and, seen from outside, nothing answers on any of the head's ports
                with pytest.raises(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _lm_job(head: cluster.HeadRecord, tmp_path: Path, corpus_dir: Path, *extra: str) -> tuple[int, str, str]:
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
    env |= {cluster.CLUSTER_DIR_ENV: str(Path(head.token_path).parent), "MLFLOW_TRACKING_URI": db}
    argv = [
        "nice", "-n", "10", sys.executable, "-m", "lmplatform", "job", "train", "experiments/tiny.yaml",
        "--storage", str(tmp_path / "runs"), "--data", str(corpus_dir / "data"),
        *TINY, "train.max_seconds=null", f"data.corpus={corpus_dir / 'corpus.txt'}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}", "sample.max_new_tokens=4", *extra,
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return done.returncode, done.stdout + done.stderr, db


def test_head_requires_its_token(head: cluster.HeadRecord) -> None:
    url = f"{head.dashboard_url}/api/jobs/"
    assert httpx.get(url, timeout=30).status_code in (401, 403)
    token = Path(head.token_path).read_text().strip()
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200


def test_job_trains_on_the_head_and_lands_in_mlflow(
    head: cluster.HeadRecord, tmp_path: Path, corpus_dir: Path
) -> None:
    rc, out, db = _lm_job(head, tmp_path, corpus_dir, "name=jobtest", "ray.num_workers=1")
    assert rc == 0, out[-4000:]
    assert re.search(r"job lmlab-train-\S+: SUCCEEDED", out), out[-2000:]
    match = re.search(r"mlflow: run ([0-9a-f]{32}) \(jobtest\) FINISHED", out)
    assert match, out[-2000:]
    with sqlite3.connect(db[len("sqlite:///") :]) as con:
        status, tag = con.execute(
            "SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.run_uuid = ? AND t.key = 'lmlab.ray_job'",
            (match.group(1),),
        ).fetchone()
    assert status == "FINISHED" and tag.startswith("lmlab-train-")
    assert (tmp_path / "runs" / "jobtest" / "best").is_dir()  # storage the job was given


def test_failing_job_is_reported_failed_with_its_error(
    head: cluster.HeadRecord, tmp_path: Path, corpus_dir: Path
) -> None:
    rc, out, _ = _lm_job(head, tmp_path, corpus_dir, "name=jobfail", "model.n_head=3")
    assert rc == 1, out[-3000:]
    assert re.search(r"job lmlab-train-\S+: FAILED", out), out[-2000:]
    assert "error: Job entrypoint command failed with exit code 2" in out
    assert "model.n_embd=32 is not allowed: must be divisible by model.n_head=3" in out
