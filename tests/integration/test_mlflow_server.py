"""A real ``mlflow server`` (as ``lm mlflow-server`` runs it): a training logs to it over HTTP, the server is killed
and restarted in the middle of the run, and nothing of the run is lost (MLflow's client retries with backoff while
the server is down; the training waits for it). Also the Host-header allow list a cluster needs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

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


class _BreakingProxy:
    """A TCP proxy in front of the server that cuts off the first ``/runs/log-batch`` answers after their headers
    (as a server killed while answering does), and passes everything else through whole."""

    def __init__(self, upstream_port: int, breaks: int) -> None:
        self.upstream_port = upstream_port
        self.breaks = breaks
        self.batches = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            request = self._read_message(conn)
            if request is None:
                return
            up.sendall(request.replace(b"Connection: keep-alive", b"Connection: close"))
            answer = self._read_message(up)
            if answer is not None and b"/runs/log-batch" in request.split(b"\r\n", 1)[0]:
                self.batches += 1
                if self.batches <= self.breaks:
                    conn.sendall(answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")  # the headers, no body
                    return
            if answer is not None:
                conn.sendall(answer)

    @staticmethod
    def _read_message(sock: socket.socket) -> bytes | None:
        """One HTTP/1.1 message with a Content-Length body (what MLflow's client and server send)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self._listener.close()


def test_a_metric_batch_whose_answer_broke_off_is_sent_again_and_stored_once(
    mlflow_server: MlflowServer,
) -> None:
    """The server dying while it answers a log-batch surfaces at once, without MLflow's retries (which cover only
    a refused connection): the logger sends the batch again; the store keeps one copy."""
    from lmplatform.tracking import MetricLogger, mlflow_client

    client = mlflow_client(mlflow_server.uri)
    exp = client.get_experiment_by_name("broken-answer") or client.get_experiment(
        client.create_experiment("broken-answer")
    )
    run_id = client.create_run(exp.experiment_id).info.run_id
    proxy = _BreakingProxy(mlflow_server.port, breaks=2)
    try:
        MetricLogger(f"http://127.0.0.1:{proxy.port}", run_id).log(7, {"train_loss": 3.5, "lr": 1e-3})
        assert proxy.batches == 3, "the batch was not sent again after its answers broke off"
        history = client.get_metric_history(run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(7, 3.5)]

        proxy.breaks, proxy.batches = 99, 0  # a server that breaks every answer: the error reaches the caller
        with pytest.raises(Exception, match="log-batch"):
            MetricLogger(f"http://127.0.0.1:{proxy.port}", run_id).log(8, {"train_loss": 3.4})
        assert proxy.batches == 3

        # an error answer (a deleted run takes no metrics) is not sent again
        proxy.breaks, proxy.batches = 0, 0
        client.delete_run(run_id)
        with pytest.raises(Exception, match="(?i)active"):
            MetricLogger(f"http://127.0.0.1:{proxy.port}", run_id).log(9, {"train_loss": 3.3})
        assert proxy.batches == 1
    finally:
        proxy.close()
