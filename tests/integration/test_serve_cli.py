"""`lm serve` as a user runs it: its own Ray and Serve in a child process, `lm generate --url`, `lm serve --stop`.

The served model is a seeded, untrained toy checkpoint (loading by path); what is tested is the command's life
cycle: it prints the URL, the model and a curl example, refuses a taken port, serves with bearer auth from
LMLAB_API_KEY, and stops on `lm serve --stop` (SIGTERM) with exit 0, leaving no process and no pid file behind;
a replica whose decoding process is killed answers 503 until Serve's health check has restarted it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from lmplatform.config import load_platform_config

from bench.procs import alive, cmdline, descendants
from lm.checkpoint import save_checkpoint
from lm.model import TransformerLM
from lm.tokenizer import train_tokenizer
from tests.integration.conftest import TINY, free_port, listener_of, nice_of

pytestmark = pytest.mark.ray

LM = [sys.executable, "-m", "lmplatform"]
KEY = "cli-test-key-123456"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    root = tmp_path_factory.mktemp("serve-cli")
    tokenizer = train_tokenizer([small_text], vocab_size=300).save(root / "tokenizer.json")
    cfg, _ = load_platform_config(None, TINY, base_dir=root)
    torch.manual_seed(0)
    return save_checkpoint(root / "ckpt", TransformerLM(cfg.model), cfg, tokenizer, {"step": 0})


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
    port = free_port()
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
        assert "bearer auth on (key: $LMLAB_API_KEY)" in out and f"curl -s {url}/v1/completions" in out
        assert '-H "Authorization: Bearer $LMLAB_API_KEY"' in out
        assert pid_file.read_text().split() == [str(server.pid), url]
        family = descendants(server.pid)  # Ray's processes, started by this server
        assert family
        replicas = [p for p in family if cmdline(p).startswith("ray::ServeReplica")]
        assert replicas and {nice_of(p) for p in replicas} == {nice_of(server.pid)}  # not Ray's nice 15
        assert len(_decoders(replicas[0])) == 1  # serve.engine=auto on the CPU: decoding in a child process
        # serve.ingress=auto with its own Ray and one replica: the replica itself listens on the port, no proxy
        assert "1 replica(s), direct ingress (the replica serves HTTP), decoding in a child process" in out
        assert listener_of(port, family) in replicas

        assert httpx.get(f"{url}/healthz").status_code == 200
        assert f"playground: open {url}/ in a browser" in out
        page = httpx.get(f"{url}/")  # the playground stays open with auth on: it asks for the key itself
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert KEY not in page.text
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "a"}).status_code == 401
        monkeypatch.setenv("LMLAB_API_KEY", KEY)
        code, out, err = _lm(capsys, "generate", "--url", url, "--prompt", "ROMEO:", "--max-new-tokens", "8")
        assert code == 0 and out.startswith("ROMEO:") and len(out) > len("ROMEO:\n"), err

        code, _, err = _lm(capsys, *args, *common)  # the same pid file: refused, naming the live server
        assert code == 2 and f"names a running lm serve (pid {server.pid} at {url})" in err, err
        other = [f"serve.pid_file={tmp_path / 'other.pid'}", common[1]]
        code, _, err = _lm(capsys, *args, *other)  # the same port: refused at once, before Ray starts
        assert code == 2 and f"serve.port={port} on 127.0.0.1 is not available" in err
        assert pid_file.read_text().split()[0] == str(server.pid) and not (tmp_path / "other.pid").exists()

        code, out, err = _lm(capsys, "serve", "--stop", *common)  # what `make serve-stop` runs
        assert code == 0 and f"stopped lm serve (pid {server.pid})" in out, err
        assert server.wait(timeout=60) == 0
        assert "SIGTERM: shutting Serve and Ray down" in (tmp_path / "serve.log").read_text()
        assert not pid_file.exists()
        left = _all_gone(family)
        assert not left, [cmdline(p)[:80] for p in left if alive(p)]
    finally:
        if server.poll() is None:
            server.kill()
        log.close()

    code, _, err = _lm(capsys, "serve", "--stop", *common)
    assert code == 2 and "no server to stop" in err
    code, _, err = _lm(capsys, "generate", "--url", url, "--prompt", "a")
    assert code == 2 and "is `lm serve` running there?" in err


def _start(tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        server = subprocess.Popen([*LM, *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    return server, log


def _wait_for(server: subprocess.Popen, log: Path, needle: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (out := log.read_text()):
        assert server.poll() is None, out
        assert time.monotonic() < deadline, out
        time.sleep(0.3)
    return out


def _all_gone(family: set[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in family if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_lm_serve_refuses_what_it_cannot_place_and_one_sigint_aborts_a_startup(
    checkpoint: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "serve.pid"
    common = ["serve", "--model", str(checkpoint), "--port", str(free_port()), f"serve.pid_file={pid_file}"]
    # more CPUs than this machine's Ray has: refused at once (Serve would wait for the replicas for ever)
    start = time.monotonic()
    done = subprocess.run(
        [*LM, *common, "serve.replicas=2", "serve.num_cpus=1000"], capture_output=True, text=True, env=_env(),
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "serve.replicas=2 x serve.num_cpus=1000 needs 2000 CPUs but the Ray cluster has" in done.stderr
    assert "lower serve.replicas or serve.num_cpus" in done.stderr
    assert time.monotonic() - start < 90 and not pid_file.exists()

    # one Ctrl-C while the replica starts: Serve and Ray shut down, nothing left running, no pid file
    server, log = _start(tmp_path, "abort", [*common, "serve.num_cpus=0.5", "serve.threads=1"], _env())
    try:
        _wait_for(server, log, "lm serve: starting 1 replica(s)")
        family = descendants(server.pid)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=90) == 128 + signal.SIGINT, log.read_text()
        out = log.read_text()
        assert "SIGINT during startup: shutting Serve and Ray down" in out and "serving " not in out
        assert not _all_gone(family) and not pid_file.exists()
    finally:
        if server.poll() is None:
            server.kill()


def test_lm_serve_on_a_shared_cluster_never_takes_over_another_app(
    ray_cluster: None, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Taken:
        async def __call__(self, request: object) -> str:
            return "first"

    first_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": first_port})
    # joins this session's Ray, with this process's auth settings (the cluster's), not _env's "disabled"
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_API_KEY"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    pid_file = tmp_path / "serve.pid"
    common = [
        "serve", "--model", str(checkpoint), "--port", str(free_port()), f"serve.pid_file={pid_file}",
        "serve.num_cpus=0.1", "serve.threads=1",
    ]  # fmt: skip
    server = None
    try:
        serve.run(Taken.bind(), name="taken", route_prefix="/taken")
        done = subprocess.run(
            [*LM, *common, "serve.app_name=taken", "serve.route_prefix=/mine"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert "serve.app_name=taken is already running on the Ray cluster at" in done.stderr
        assert "pick another name with serve.app_name=NAME" in done.stderr
        done = subprocess.run(  # direct ingress is switched on in the environment of a Ray lm serve starts
            [*LM, *common, "serve.app_name=direct", "serve.ingress=direct"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and "serve.ingress=direct needs lm serve's own Ray" in done.stderr

        server, log = _start(
            tmp_path, "second", [*common, "serve.app_name=second", "serve.route_prefix=/second"], env
        )
        out = _wait_for(server, log, "curl -s")
        url = f"http://127.0.0.1:{first_port}/second"  # where Serve really listens, not --port
        assert "serving there, not at 127.0.0.1:" in out and f"at {url}\n" in out, out
        assert "1 replica(s), Serve's HTTP proxy" in out  # serve.ingress=auto on a shared cluster
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        code, out, err = _lm(capsys, "serve", "--stop", f"serve.pid_file={pid_file}")
        assert code == 0, err
        assert server.wait(timeout=60) == 0
        assert "SIGTERM: deleting application second from the Ray cluster at" in log.read_text()
        assert set(serve.status().applications) == {"taken"}  # the first app is untouched
        assert httpx.get(f"http://127.0.0.1:{first_port}/taken").text == "first"
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        serve.shutdown()


def _decoders(replica: int) -> list[int]:
    """The replica's decoding process (serve.engine=process)."""
    return [p for p in descendants(replica) if "_child_main" in cmdline(p) and alive(p)]


def test_a_killed_decoding_process_gets_503_then_serve_restarts_the_replica(
    checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    args = ["serve", "--model", str(checkpoint), "--port", str(port), "serve.num_cpus=0.5", "serve.threads=1"]
    server, log = _start(tmp_path, "serve", [*args, f"serve.pid_file={tmp_path / 'serve.pid'}"], _env())
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "ROMEO:", "max_tokens": 4}
    try:
        _wait_for(server, log, "curl -s")
        family = descendants(server.pid)
        (replica,) = [p for p in family if cmdline(p).startswith("ray::ServeReplica")]
        (decoder,) = _decoders(replica)
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200

        long = {"prompt": "ROMEO:", "max_tokens": 1000, "stream": True, "seed": 1}  # seeded: no early EOS
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # decoding has started
            os.kill(decoder, signal.SIGKILL)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "engine_unavailable", events[-1]  # in-band, after the 200

        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{url}/v1/completions", json=body)).status_code == 200:
            assert time.monotonic() < deadline, "the replica still answers 200 after its decoder died"
            time.sleep(0.05)  # until the replica has read the end of its decoder's socket
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"  # for load balancers

        deadline = time.monotonic() + 120  # 3 failed health checks 2 s apart, then a new replica starts
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (
                f"no recovery: {r.status_code if r else None}\n{log.read_text()}"
            )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
                if r.status_code == 200:
                    break
            time.sleep(0.5)
        assert len(r.json()["choices"][0]["text"]) > 0
        (new_replica,) = [p for p in descendants(server.pid) if cmdline(p).startswith("ray::ServeReplica")]
        assert new_replica != replica and not alive(replica) and len(_decoders(new_replica)) == 1
        family |= descendants(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, log.read_text()
    assert not _all_gone(family)  # both replicas and both decoding processes, and Ray
