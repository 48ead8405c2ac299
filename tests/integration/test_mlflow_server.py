"""A real ``mlflow server`` (as ``lm mlflow-server`` runs it): a training logs to it over HTTP, the server is killed
and restarted in the middle of the run, and nothing of the run is lost (MLflow's client retries with backoff while
the server is down; the training waits for it). Also the Host-header allow list a cluster needs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.conftest import TINY
from tests.integration.servers import MlflowServer

STEPS = 60


def _history(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_server_allows_cluster_host_names_and_refuses_others(mlflow_server: MlflowServer) -> None:
    url = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(url, headers={"Host": f"mlflow.lmlab.svc:{mlflow_server.port}"}).status_code == 200
    assert httpx.get(url, headers={"Host": "127.0.0.1"}).status_code == 200
    assert httpx.get(url, headers={"Host": "attacker.example"}).status_code == 403


def test_training_survives_a_server_restart(
    mlflow_server: MlflowServer, tmp_path: Path, corpus_dir: Path
) -> None:
    from lmplatform.tracking import mlflow_client

    server = mlflow_server
    overrides = [
        *TINY,
        "name=srvtest",
        f"train.max_steps={STEPS}",
        "train.max_seconds=null",
        f"train.eval_interval={STEPS // 2}",
        f"train.checkpoint_interval={STEPS // 2}",
        f"data.corpus={corpus_dir / 'corpus.txt'}",
        f"data.cache_dir={corpus_dir / 'data'}",
        f"train.out_dir={tmp_path / 'run'}",
        f"tracking.uri={server.uri}",
        "sample.max_new_tokens=4",
    ]
    train = subprocess.Popen(
        [
            "nice",
            "-n",
            "10",
            sys.executable,
            "-m",
            "lmplatform",
            "train",
            "--local",
            "--no-sample",
            str(Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"),
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # MLflow's default backoff (factor 2: retries 4, 8, 16, 32 s apart) would idle past the server's restart;
        # factor 1 halves that wait and still keeps retrying for about two minutes.
        env={**os.environ, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"},
    )
    try:
        client = mlflow_client(server.uri)
        deadline = time.monotonic() + 120
        run_id, logged = None, []
        while time.monotonic() < deadline and len(logged) < 10:  # the run is going and logging over HTTP
            assert train.poll() is None, train.communicate()[0][-3000:]
            exp = client.get_experiment_by_name("srvtest")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs:
                run_id = runs[0].info.run_id
                logged = _history(client, run_id, "train_loss")
            time.sleep(0.2)
        assert run_id is not None and len(logged) >= 10, "the training never logged to the server"
        server.kill()  # SIGKILL: no graceful shutdown
        down_at = time.monotonic()
        time.sleep(2)
        server.start()
        out, _ = train.communicate(timeout=240)
    finally:
        if train.poll() is None:
            train.kill()
    print(
        f"server down {time.monotonic() - down_at:.0f}s before the run finished; logged before: {len(logged)}"
    )
    assert train.returncode == 0, out[-3000:]
    assert logged[-1] < STEPS, "the run ended before the server went down: the test proved nothing"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = _history(client, run_id, "train_loss")
    assert set(steps) == set(range(1, STEPS + 1)), (
        f"missing steps: {sorted(set(range(1, STEPS + 1)) - set(steps))}"
    )
    assert {"val_loss", "val_bpb", "dev_loss"} <= set(run.data.metrics)
    assert client.get_registered_model("lmlab-srvtest").name == "lmlab-srvtest"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts, "no artifacts reached the server"
