"""Real processes for the scale-out tests: an ``mlflow server`` started the way ``lm mlflow-server`` starts it, on
a free port of 127.0.0.1, with its store in a temp dir; stopped (or killed) by its own process group only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from lmplatform.cluster import mlflow_server_argv


class MlflowServer:
    """One ``mlflow server`` process; :meth:`kill` and :meth:`start` again keep the port and the store."""

    def __init__(self, root: Path, port: int, allowed: tuple[str, ...] = ()) -> None:
        self.root, self.port, self.allowed = root, port, allowed
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "mlflow-server.log"

    def argv(self) -> list[str]:
        """What ``lm mlflow-server`` would run for this store and port."""
        return mlflow_server_argv(
            host="127.0.0.1",
            port=self.port,
            backend_store_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            artifacts_destination=str(self.root / "mlartifacts"),
            allowed=self.allowed,
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start it and wait until /health answers."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", *self.argv()],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited: {self.log.read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(
            f"mlflow server on port {self.port} did not come up: {self.log.read_text()[-2000:]}"
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal its whole process group (the server and its workers), then reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_mlflow_server(root: Path, port: int, allowed: tuple[str, ...] = ()) -> Iterator[MlflowServer]:
    """A running server for the block; always stopped after it."""
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root, port, allowed)
    try:
        server.start()
        yield server
    finally:
        server.kill(signal.SIGTERM)
