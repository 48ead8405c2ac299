"""lmplatform/serve.py without Ray: request parsing, the event stream's failure after its first byte, and the
checks `lm serve` makes before it starts anything (resources, pid file, rows per request, auth header).

What the HTTP tests in test_serve.py cannot provoke: an engine failure in the middle of a stream, which must
reach the client as an ``error`` event before ``[DONE]`` (never a silently truncated 200), freeing the rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lmplatform.config import ServeConfig
from lmplatform.serve import (
    Limits,
    LMServer,
    Metrics,
    RequestError,
    ServeError,
    check_pid_file,
    check_resources,
    direct_ingress_env,
    engine_kind,
    parse_completion,
    parse_generate,
    parse_json,
    playground_page,
    stream_from_server,
    use_direct_ingress,
)

from lm.config import ConfigError

LIMITS = Limits(max_prompt_tokens=32, max_new_tokens=64, max_n=4, max_stop=2, max_body_bytes=1000)


class _Stream:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _server() -> Any:
    cls = LMServer.func_or_class.__mro__[1]  # our class under Serve's ingress wrapper
    server = cls.__new__(cls)  # its methods without a model
    server.metrics = Metrics()
    return server


async def _drain(response: Any) -> list[str]:
    return [chunk.decode() async for chunk in response.body_iterator]


def test_a_failure_after_the_first_byte_is_an_error_event_then_done() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"text": "a"}
        raise RuntimeError("decoding failed: device lost")

    server, stream = _server(), _Stream()

    async def run() -> list[str]:
        response = await server._sse("generate", time.perf_counter(), events(), [stream])
        assert response.status_code == 200 and response.media_type == "text/event-stream"
        return await _drain(response)

    chunks = asyncio.run(run())
    assert chunks[0] == 'data: {"text": "a"}\n\n'  # the first event goes out at once
    events_sent = "".join(chunks).split("\n\n")
    error = json.loads(events_sent[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "device lost" in error["message"]
    assert events_sent[2:] == ["data: [DONE]", ""] and stream.cancelled
    assert (
        'lmlab_requests_total{endpoint="generate",status="500"} 1.0' in server.metrics.render({}, 1).decode()
    )


def test_a_failure_before_the_first_byte_raises_so_the_status_can_still_say_so() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        raise RuntimeError("no row")
        yield {}  # pragma: no cover - makes this an async generator

    stream = _Stream()
    with pytest.raises(RuntimeError, match="no row"):
        asyncio.run(_server()._sse("generate", time.perf_counter(), events(), [stream]))
    assert stream.cancelled


def test_parsing_fills_defaults_and_names_the_bad_field() -> None:
    req = parse_completion({"prompt": ["a", [1, 2]], "n": 2, "stop": "\n", "seed": 3}, LIMITS, vocab_size=300)
    assert req.prompts == ["a", [1, 2]] and req.n == 2 and req.seed == 3
    assert req.sampling == {
        "max_new_tokens": 16, "temperature": 1.0, "top_k": None, "top_p": None, "stop": ("\n",), "logprobs": None,
    }  # fmt: skip
    native = parse_generate(
        {"prompt": "x", "top_p": 1.0}, LIMITS, {"temperature": 0.8, "top_k": 50, "max_new_tokens": 200}
    )
    assert native.sampling["max_new_tokens"] == 64 and native.sampling["top_k"] == 50  # capped by the limit
    assert native.sampling["top_p"] is None and native.sampling["temperature"] == 0.8
    for body, param in (
        ({"prompt": "a", "stop": ["x", "y", "z"]}, "stop"),
        ({"prompt": "a", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "a", "n": True}, "n"),
        ({"prompt": "a", "top_k": 2.5}, "top_k"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
    ):
        with pytest.raises(RequestError) as info:
            parse_completion(body, LIMITS, vocab_size=300)
        assert info.value.param == param and info.value.status == 400
    with pytest.raises(RequestError, match="not valid UTF-8"):
        parse_json(b'{"prompt": "\xc3"}')


def test_a_request_that_can_never_fit_a_replica_is_a_400_naming_n_or_prompt() -> None:
    limits = dataclasses.replace(LIMITS, max_rows=80)  # serve.max_batch_size 16 + max_queued_requests 64
    body = {"prompt": ["a"] * 32, "n": 4}  # within 32 prompts and max_n, but 128 rows: a 503 for ever before
    with pytest.raises(RequestError) as info:
        parse_completion(body, limits, vocab_size=300)
    assert info.value.status == 400 and info.value.param == "n"
    assert "needs 128 rows" in info.value.message and "takes at most 80 at once" in info.value.message
    with pytest.raises(RequestError) as info:
        parse_completion({"prompt": ["a"] * 3}, dataclasses.replace(LIMITS, max_rows=2), vocab_size=300)
    assert info.value.param == "prompt" and "needs 3 rows" in info.value.message
    assert parse_completion({"prompt": ["a"] * 20, "n": 4}, limits, vocab_size=300).n == 4
    # a config whose own max_n cannot fit one replica is refused up front
    with pytest.raises(ConfigError, match=r"serve.max_n=4 is not allowed: at most 2"):
        ServeConfig(max_batch_size=1, max_queued_requests=1)
    assert ServeConfig().max_request_rows() == 80 and ServeConfig(batching="none").max_request_rows() == 65
    assert ServeConfig(batching="static", max_batch_size=1, max_queued_requests=1).max_request_rows() is None


def test_replicas_the_cluster_cannot_place_are_refused_naming_the_keys() -> None:
    with pytest.raises(ServeError) as info:
        check_resources(ServeConfig(replicas=3), {"CPU": 2.0})
    assert str(info.value) == (
        "serve.replicas=3 x serve.num_cpus=1 needs 3 CPUs but the Ray cluster has 2: lower serve.replicas or "
        "serve.num_cpus (e.g. serve.num_cpus=0.66)"
    )
    with pytest.raises(ServeError, match=r"serve.device=cuda needs one GPU per replica .* has 0 GPUs"):
        check_resources(ServeConfig(device="cuda"), {"CPU": 2.0})
    check_resources(ServeConfig(replicas=4, num_cpus=0.5), {"CPU": 2.0})
    check_resources(ServeConfig(device="cuda"), {"CPU": 2.0, "GPU": 1.0})


def test_decoding_runs_in_a_child_process_on_the_cpu_unless_asked_otherwise() -> None:
    assert engine_kind(ServeConfig(), "cpu") == "process"
    assert engine_kind(ServeConfig(device="cuda"), "cuda") == "thread"  # the child path is untested on a GPU
    assert engine_kind(ServeConfig(device="auto"), "auto") == ""  # a replica resolves it
    assert engine_kind(ServeConfig(engine="thread"), "cpu") == "thread"
    assert engine_kind(ServeConfig(engine="process", device="cuda"), "cuda") == "process"
    with pytest.raises(ConfigError, match=r"serve.engine='fork' is not allowed"):
        ServeConfig(engine="fork")


def test_direct_ingress_only_where_lm_serve_owns_the_cluster_and_the_port() -> None:
    assert use_direct_ingress(ServeConfig(), own_cluster=True)  # auto: own Ray, one replica
    assert not use_direct_ingress(ServeConfig(replicas=2, num_cpus=0.5), own_cluster=True)
    assert not use_direct_ingress(ServeConfig(), own_cluster=False)  # auto on a shared cluster: Serve's proxy
    assert not use_direct_ingress(ServeConfig(ingress="proxy"), own_cluster=True)
    assert use_direct_ingress(ServeConfig(ingress="direct"), own_cluster=True)
    with pytest.raises(ServeError, match="serve.ingress=direct needs lm serve's own Ray"):
        use_direct_ingress(ServeConfig(ingress="direct"), own_cluster=False)
    with pytest.raises(
        ConfigError, match=r"serve.ingress='direct' is not allowed: direct needs serve.replicas=1"
    ):
        ServeConfig(ingress="direct", replicas=2)
    with pytest.raises(ConfigError, match=r"serve.ingress='sideways' is not allowed"):
        ServeConfig(ingress="sideways")
    env = direct_ingress_env(8123)  # the replica's port range is exactly [8123, 8124)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "8123",
        "8124",
    )


def test_a_pid_file_naming_a_live_server_is_refused_and_a_stale_one_removed(tmp_path: Path) -> None:
    pid_file = tmp_path / "serve.pid"
    # a process whose command line looks like `lm serve` (what _is_lm_serve checks), once it has exec'd
    live = subprocess.Popen([sys.executable, "-c", "import sys, time; print(1, flush=True); time.sleep(60)", "serve"],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert live.stdout is not None and live.stdout.readline()
    try:
        pid_file.write_text(f"{live.pid}\nhttp://127.0.0.1:8137\n")
        with pytest.raises(ServeError) as info:
            check_pid_file(pid_file)
        message = str(info.value)
        assert f"names a running lm serve (pid {live.pid} at http://127.0.0.1:8137)" in message
        assert "lm serve --stop" in message and "serve.pid_file=PATH" in message and pid_file.exists()
    finally:
        live.kill()
        live.wait()
    check_pid_file(pid_file)  # the process is gone: a stale file, removed
    assert not pid_file.exists()
    check_pid_file(pid_file)  # and no file at all is fine


def test_bearer_scheme_is_case_insensitive_and_the_key_is_not() -> None:
    server = _server()
    server.api_key = "secret-key-123"
    for header in ("Bearer secret-key-123", "bearer secret-key-123", "BEARER  secret-key-123"):
        server._check_auth(SimpleNamespace(headers={"authorization": header}))
    for header in (
        "",
        "secret-key-123",
        "Basic secret-key-123",
        "Bearer SECRET-KEY-123",
        "Bearer secret-key",
    ):
        with pytest.raises(RequestError) as info:
            server._check_auth(SimpleNamespace(headers={"authorization": header}))
        assert info.value.status == 401


def test_lm_generate_takes_the_openai_base_url_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    asked: list[str] = []

    def urlopen(request: Any, timeout: float) -> Any:
        asked.append(request.full_url)
        raise urllib.error.URLError("refused")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for url in ("http://127.0.0.1:8137", "http://127.0.0.1:8137/", "http://127.0.0.1:8137/v1/"):
        with pytest.raises(ServeError, match="is `lm serve` running there"):
            stream_from_server(url, "a", 4, 1.0, None, None, 0, out=io.StringIO())
    assert asked == ["http://127.0.0.1:8137/v1/generate"] * 3


def test_playground_page_policy_pins_its_own_script_and_style() -> None:
    # The browser runs only what the Content-Security-Policy allows: the page's one <script> and <style>, by hash
    # (test_playground.py shows they do run). Inline handlers (onclick=...) and style attributes would be
    # blocked, so the page must not rely on any; nothing may come from another origin.
    import base64
    import hashlib
    import re

    html, csp = playground_page()
    page = re.sub(r"<!--.*?-->", "", html.decode(), flags=re.S)
    policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        assert (
            policy[f"{tag}-src"]
            == f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        )
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    markup = re.sub(r"<(script|style)>.*?</\1>", "", page, flags=re.S)
    assert not re.search(r"\s(on\w+|style)\s*=", markup), (
        "inline handlers and style attributes are blocked by the CSP"
    )
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", page), (
        "the page must be self-contained"
    )
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page  # text goes in as text nodes
    assert playground_page() is playground_page()  # read once per process


def test_serve_precision_is_checked_and_the_replicas_model_runs_at_it(
    tmp_path: Path, small_text: str
) -> None:
    import torch
    from lmplatform import serve as serve_module

    from lm.checkpoint import save_checkpoint
    from lm.config import ExperimentConfig, ModelConfig
    from lm.model import TransformerLM
    from lm.tokenizer import train_tokenizer

    with pytest.raises(ConfigError, match=r"serve.precision='fp16' is not allowed: one of fp32, bf16, int8"):
        ServeConfig(precision="fp16")
    with pytest.raises(
        ConfigError, match=r"serve.precision='int8' is not allowed: int8 runs on the CPU only"
    ):
        ServeConfig(precision="int8", device="cuda")
    assert ServeConfig(precision="bf16", device="cuda").precision == "bf16"

    tok = train_tokenizer([small_text], vocab_size=300)
    cfg = ExperimentConfig(model=ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_embd=32))
    save_checkpoint(tmp_path / "ckpt", TransformerLM(cfg.model), cfg, tok)
    for precision, linear in (("bf16", torch.nn.Linear), ("int8", torch.ao.nn.quantized.dynamic.Linear)):
        served = serve_module.load_model(str(tmp_path / "ckpt"), "", "toy", "cpu", precision)
        assert served.info["precision"] == precision and isinstance(served.model.lm_head, linear)
        assert served.model.tok_emb.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_lm_generate_url_refuses_a_precision_the_server_decides(capsys: pytest.CaptureFixture[str]) -> None:
    from lmplatform.cli import main

    assert main(["generate", "--url", "http://127.0.0.1:9", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--precision int8 applies to a local checkpoint" in err and "serve.precision" in err
