"""`lm serve` as a user runs it: its own Ray and Serve in a child process, `lm generate --url`, `lm serve --stop`.

The served model is a seeded, untrained toy checkpoint (loading by path); what is tested is the command's life
cycle: it prints the URL, the model and a curl example, refuses a taken port, serves with bearer auth from
LMLAB_API_KEY, and stops on `lm serve --stop` (SIGTERM) with exit 0, leaving no process and no pid file behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from lmplatform.config import load_platform_config

from lm.checkpoint import save_checkpoint
from lm.model import TransformerLM
from lm.tokenizer import train_tokenizer
from tests.integration.conftest import TINY

pytestmark = pytest.mark.ray

LM = [sys.executable, "-m", "lmplatform"]
KEY = "cli-test-key-123456"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    root = tmp_path_factory.mktemp("serve-cli")
    tokenizer = train_tokenizer([small_text], vocab_size=300).save(root / "tokenizer.json")
    cfg, _ = load_platform_config(None, TINY, base_dir=root)
    torch.manual_seed(0)
    return save_checkpoint(root / "ckpt", TransformerLM(cfg.model), cfg, tokenizer, {"step": 0})


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: Ray's gcs, raylet and workers that the server started)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LMLAB_API_KEY")}
    return {**env, "RAY_AUTH_MODE": "disabled", **extra}


def _lm(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``lm ARGS`` in this process (each child ``lm`` pays seconds of imports): exit code, stdout, stderr."""
    from lmplatform.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_lm_serve_runs_in_the_foreground_and_stops_cleanly(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    pid_file = tmp_path / "serve.pid"
    common = [f"serve.pid_file={pid_file}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    args = ["serve", "--model", str(checkpoint), "--port", str(port), "serve.num_cpus=0.5", "serve.threads=1"]
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [*LM, *args, *common], stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(LMLAB_API_KEY=KEY)
    )
    try:
        deadline = time.monotonic() + 120
        while "curl -s" not in (out := (tmp_path / "serve.log").read_text()):
            assert server.poll() is None, out
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert f"serving itest ({checkpoint}) at {url}" in out
        assert "bearer auth on" in out and f"curl -s {url}/v1/completions" in out
        assert pid_file.read_text().strip() == str(server.pid)
        family = _descendants(server.pid)  # Ray's processes, started by this server
        assert family

        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "a"}).status_code == 401
        monkeypatch.setenv("LMLAB_API_KEY", KEY)
        code, out, err = _lm(capsys, "generate", "--url", url, "--prompt", "ROMEO:", "--max-new-tokens", "8")
        assert code == 0 and out.startswith("ROMEO:") and len(out) > len("ROMEO:\n"), err

        code, _, err = _lm(capsys, *args, *common)  # the same port again: refused at once, before Ray starts
        assert code == 2 and f"serve.port={port} on 127.0.0.1 is not available" in err

        code, out, err = _lm(capsys, "serve", "--stop", *common)  # what `make serve-stop` runs
        assert code == 0 and f"stopped lm serve (pid {server.pid})" in out, err
        assert server.wait(timeout=60) == 0
        assert "SIGTERM: shutting Serve and Ray down" in (tmp_path / "serve.log").read_text()
        assert not pid_file.exists()
        deadline = time.monotonic() + 30
        while (alive := [p for p in family if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive if _alive(p)]
    finally:
        if server.poll() is None:
            server.kill()
        log.close()

    code, _, err = _lm(capsys, "serve", "--stop", *common)
    assert code == 2 and "no server to stop" in err
    code, _, err = _lm(capsys, "generate", "--url", url, "--prompt", "a")
    assert code == 2 and "is `lm serve` running there?" in err
