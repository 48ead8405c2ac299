"""lmplatform/serve.py over real HTTP on 127.0.0.1: one Serve instance for the module, five applications.

- ``main`` (route ``/``): continuous batching, the model loaded by the registry alias models:/lmlab-itest@best;
- ``static`` and ``none`` (routes ``/static``, ``/none``): the other batching modes, loaded by path;
- ``int8`` (route ``/int8``): continuous batching with serve.precision=int8, loaded by path;
- ``guarded`` (route ``/guarded``): bearer auth and a one-row, one-slot queue answering 429 with Retry-After.

The model is the 22K-parameter toy of conftest's TINY, trained for 20 steps with MLflow tracking (so it is
registered) at module setup. Replicas reserve a tenth of a CPU each, so all four fit the session's 2-CPU Ray.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from lmplatform.config import ServeConfig
from lmplatform.serve import ServerSettings, build_app, iter_sse

from tests.integration.conftest import TINY, free_port

pytestmark = pytest.mark.ray

API_KEY = "test-key-0123456789"
MAX_NEW = 4000  # the main app's limit: long enough that a disconnected stream is cut well before its end
NAME = "lmlab-itest"  # registered model name = what /v1/models lists for the alias-loaded app


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Any]:
    """The toy model trained in-process with MLflow tracking: its checkpoint and the store it is registered in."""
    from lmplatform.cli import main

    root = tmp_path_factory.mktemp("serve-model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [
        *TINY,
        f"data.corpus={corpus_dir / 'corpus.txt'}",
        f"data.cache_dir={corpus_dir / 'data'}",
        f"train.out_dir={root / 'run'}",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
    ]
    tiny = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
    assert main(["train", "--local", "--no-sample", str(tiny), *overrides]) == 0
    return {"checkpoint": root / "run" / "best", "uri": uri, "experiment": "itest"}


def _settings(
    trained: dict[str, Any], ref: str | None, api_key: str | None = None, **serve: Any
) -> ServerSettings:
    base = {"num_cpus": 0.1, "threads": 1, "max_new_tokens": MAX_NEW, "max_batch_size": 8}
    cfg = ServeConfig(**{**base, **serve})
    return ServerSettings(cfg, ref, trained["uri"], trained["experiment"], api_key)


@pytest.fixture(scope="module")
def server(ray_cluster: None, trained: dict[str, Any]) -> Iterator[str]:
    """Serve on a free loopback port with the five applications; yields the base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ckpt = str(trained["checkpoint"])
    apps = {
        "main": ("/", _settings(trained, None)),
        "static": ("/static", _settings(trained, ckpt, batching="static", batch_wait_timeout_s=0.2)),
        "none": ("/none", _settings(trained, ckpt, batching="none")),
        "int8": ("/int8", _settings(trained, ckpt, precision="int8")),
        "guarded": (
            "/guarded",
            _settings(
                trained,
                ckpt,
                API_KEY,
                max_batch_size=1,
                max_queued_requests=1,
                max_n=2,  # one prompt with n=max_n must fit the replica's 2 rows
                backpressure_status=429,
                retry_after_s=2,
                max_new_tokens=400,
            ),
        ),  # fmt: skip
    }
    try:
        for name, (route, settings) in apps.items():
            serve.run(build_app(settings), name=name, route_prefix=route, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    # no auth on the main app, but the client insists on a key; retries off so every status is seen
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _generate(http: httpx.Client, prefix: str = "", **body: Any) -> dict[str, Any]:
    r = http.post(f"{prefix}/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return list(iter_sse(lines))


# --------------------------------------------------------------------------------------------------------------
# End to end


def test_generate_native_and_streamed(http: httpx.Client) -> None:
    out = _generate(http, prompt="ROMEO:", max_new_tokens=12, temperature=0)
    assert out["finish_reason"] in ("eos", "length")
    assert out["usage"]["completion_tokens"] == len(out["tokens"]) <= 12
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + len(out["tokens"])
    assert out["timing"]["total_s"] > 0 and out["timing"]["time_to_first_token_s"] is not None
    assert out["model"] == NAME

    events = _sse(
        http, "/v1/generate", {"prompt": "ROMEO:", "max_new_tokens": 12, "temperature": 0, "stream": True}
    )
    *deltas, final = events
    assert "".join(e["text"] for e in deltas) == out["text"]
    assert [t for e in deltas for t in e["tokens"]] == out["tokens"]
    assert final["finish_reason"] == out["finish_reason"] and final["usage"] == out["usage"]

    long = _generate(http, prompt="", max_new_tokens=80, temperature=1.0, seed=3)  # past block_size (32)
    assert long["usage"]["completion_tokens"] > 32 or long["finish_reason"] == "eos"


def test_openai_client_completions_stream_n_stop_seed(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list().data] == [NAME]
    c = oai.completions.create(model=NAME, prompt="ROMEO:", max_tokens=20, temperature=0)
    text = c.choices[0].text
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0

    chunks = list(
        oai.completions.create(
            model=NAME, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens and chunks[-1].choices == []

    # n > 1 with a seed: n choices, reproducible; another seed gives other text
    kw = {"model": NAME, "prompt": ["To be", "KING:"], "max_tokens": 16, "temperature": 1.0, "n": 3}
    a, b = oai.completions.create(seed=7, **kw), oai.completions.create(seed=7, **kw)
    assert sorted(ch.index for ch in a.choices) == list(range(6))
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    other = oai.completions.create(seed=8, **kw)
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]

    # a stop string taken from the greedy text: the text ends just before it, and it never leaks
    long = oai.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    stop = long[10:13]
    cut = long[: long.index(stop)]
    for stream in (False, True):
        r = oai.completions.create(
            model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0, stop=[stop], stream=stream
        )
        got = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
        assert got == cut and stop not in got

    # echo and logprobs
    lp = oai.completions.create(
        model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = lp.choices[0]
    assert choice.text.startswith("ROMEO:")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == lp.usage.completion_tokens
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)


def test_model_info_healthz_and_metrics(http: httpx.Client, trained: dict[str, Any]) -> None:
    info = http.get("/v1/model").json()
    assert info["id"] == NAME and info["registered_model"] == NAME and str(info["version"]) == "1"
    assert info["run_id"] and info["source"] == "models:/lmlab-itest@best"
    assert info["config"]["model"]["n_embd"] == 32 and "dev_bpb" in info["metrics"]
    assert info["checkpoint"] is None  # the replica removed its downloaded copy once the weights were loaded
    assert (
        info["serving"]["batching"] == "continuous" and info["serving"]["limits"]["max_new_tokens"] == MAX_NEW
    )
    assert http.get("/healthz").json()["status"] == "ok"

    http.post("/v1/completions", json={"prompt": "a", "temperature": -1})
    _generate(http, prompt="a", max_new_tokens=3)
    text = http.get("/metrics").text
    for needle in (
        'lmlab_requests_total{endpoint="generate",status="200"}',
        'lmlab_request_errors_total{status="400"}',
        "lmlab_completion_tokens_total",
        "lmlab_time_to_first_token_seconds_count",
        "lmlab_queue_length",
        "lmlab_batch_occupancy",
    ):
        assert needle in text, needle


def test_serve_precision_int8_decodes_and_says_so(http: httpx.Client) -> None:
    assert http.get("/v1/model").json()["precision"] == "fp32"
    assert http.get("/int8/v1/model").json()["precision"] == "int8"
    out = _generate(http, "/int8", prompt="ROMEO:", max_new_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] == 8 or out["finish_reason"] == "eos"


# --------------------------------------------------------------------------------------------------------------
# Batching: concurrent requests decode the same tokens as alone


@pytest.mark.parametrize("prefix", ["", "/static", "/none"], ids=["continuous", "static", "none"])
def test_batched_requests_match_alone(http: httpx.Client, prefix: str) -> None:
    requests = [
        {"prompt": "ROMEO:", "max_new_tokens": 30, "temperature": 0},
        {"prompt": "First Citizen:\nBefore we proceed", "max_new_tokens": 8, "temperature": 0},
        {"prompt": "", "max_new_tokens": 45, "temperature": 0},  # runs past block_size
        {"prompt": "KING:", "max_new_tokens": 25, "temperature": 1.0, "top_k": 20, "seed": 11},
        {"prompt": "What", "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 5},
        {"prompt": "O", "max_new_tokens": 20, "temperature": 1.2, "seed": 99},
    ]
    alone = [_generate(http, prefix, **r)["tokens"] for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _generate(http, prefix, **r)["tokens"], requests))
    assert together == alone


# --------------------------------------------------------------------------------------------------------------
# Bad input: 4xx with an OpenAI-style error naming the field, and the server keeps serving


def _raw(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": "application/json"}}


def _bad_cases() -> list[tuple[str, str, str, dict[str, Any], int, str | None]]:
    c, g = "/v1/completions", "/v1/generate"
    ok = {"model": NAME, "prompt": "ROMEO:"}
    long_prompt = "the king " * 200  # far more than the 32-token block_size

    def comp(**kw: Any) -> dict[str, Any]:
        return {"json": {**ok, **kw}}

    return [
        ("invalid json", "POST", c, _raw(b'{"prompt": "a",'), 400, None),
        ("invalid utf-8", "POST", c, _raw(b'{"prompt": "\xff\xfe"}'), 400, None),
        ("not an object", "POST", c, {"json": ["a"]}, 400, None),
        ("deep nesting", "POST", c, _raw(b"[" * 20000 + b"]" * 20000), 400, None),
        ("missing prompt", "POST", c, {"json": {"model": NAME}}, 400, "prompt"),
        ("prompt number", "POST", c, comp(prompt=5), 400, "prompt"),
        ("prompt empty list", "POST", c, comp(prompt=[]), 400, "prompt"),
        ("prompt mixed list", "POST", c, comp(prompt=["a", 1]), 400, "prompt"),
        ("token id out of range", "POST", c, comp(prompt=[[99999]]), 400, "prompt"),
        ("lone surrogate", "POST", c, _raw(b'{"prompt": "\\ud800"}'), 400, "prompt"),
        ("prompt too long", "POST", c, comp(prompt=long_prompt), 400, "prompt"),
        ("too many prompts", "POST", c, comp(prompt=["a"] * 33), 400, "prompt"),
        ("max_tokens string", "POST", c, comp(max_tokens="10"), 400, "max_tokens"),
        ("max_tokens zero", "POST", c, comp(max_tokens=0), 400, "max_tokens"),
        ("max_tokens fraction", "POST", c, comp(max_tokens=1.5), 400, "max_tokens"),
        ("max_tokens over limit", "POST", c, comp(max_tokens=MAX_NEW + 1), 400, "max_tokens"),
        ("temperature negative", "POST", c, comp(temperature=-0.5), 400, "temperature"),
        ("temperature NaN", "POST", c, _raw(b'{"prompt": "a", "temperature": NaN}'), 400, "temperature"),
        ("temperature infinite", "POST", c, _raw(b'{"prompt": "a", "temperature": 1e999}'), 400, "temperature"),
        ("temperature string", "POST", c, comp(temperature="hot"), 400, "temperature"),
        ("top_p zero", "POST", c, comp(top_p=0), 400, "top_p"),
        ("top_p above one", "POST", c, comp(top_p=1.5), 400, "top_p"),
        ("top_k negative", "POST", c, comp(top_k=-1), 400, "top_k"),
        ("n zero", "POST", c, comp(n=0), 400, "n"),
        ("n over max_n", "POST", c, comp(n=5), 400, "n"),
        ("too many stops", "POST", c, comp(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        ("stop number", "POST", c, comp(stop=5), 400, "stop"),
        ("stop empty", "POST", c, comp(stop=[""]), 400, "stop"),
        ("unknown model", "POST", c, comp(model="gpt-5"), 404, "model"),
        ("logprobs over 5", "POST", c, comp(logprobs=6), 400, "logprobs"),
        ("stream not bool", "POST", c, comp(stream="yes"), 400, "stream"),
        ("stream_options without stream", "POST", c, comp(stream_options={"include_usage": True}), 400, "stream_options"),
        ("echo not bool", "POST", c, comp(echo=1), 400, "echo"),
        ("seed negative", "POST", c, comp(seed=-1), 400, "seed"),
        ("unsupported penalty", "POST", c, comp(presence_penalty=0.5), 400, "presence_penalty"),
        ("unknown field", "POST", c, comp(frobnicate=True), 400, "frobnicate"),
        ("body too large", "POST", c, comp(prompt="x" * 70_000), 413, None),
        ("native unknown field", "POST", g, {"json": {"prompt": "a", "max_tokens": 5}}, 400, "max_tokens"),
        ("native missing prompt", "POST", g, {"json": {"max_new_tokens": 5}}, 400, "prompt"),
        ("native prompt list", "POST", g, {"json": {"prompt": ["a"]}}, 400, "prompt"),
        ("native over limit", "POST", g, {"json": {"prompt": "a", "max_new_tokens": MAX_NEW + 1}}, 400, "max_new_tokens"),
        ("native stream stream", "POST", g, {"json": {"prompt": "a", "stream": "no"}}, 400, "stream"),
        ("unknown path", "GET", "/v1/nothing", {}, 404, None),
        ("wrong method", "GET", c, {}, 405, None),
    ]  # fmt: skip


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(http: httpx.Client) -> None:
    cases = _bad_cases()
    assert len(cases) >= 30
    for name, method, path, kwargs, status, param in cases:
        r = http.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and error["code"], name
        assert error["param"] == param, (name, error)
        # with streaming asked for, a refusal is still a plain JSON error (decided before the first byte)
        body = kwargs.get("json")
        if isinstance(body, dict) and status == 400 and param not in ("stream", "stream_options"):
            streamed = http.request(method, path, json={**body, "stream": True})
            assert streamed.status_code == 400 and "error" in streamed.json(), name
    assert _generate(http, prompt="ROMEO:", max_new_tokens=5)["usage"]["completion_tokens"] > 0
    assert "lmlab_request_errors_total" in http.get("/metrics").text


# --------------------------------------------------------------------------------------------------------------
# Disconnects, auth, backpressure


def _engine(http: httpx.Client, prefix: str = "", **headers: str) -> dict[str, float]:
    return http.get(f"{prefix}/v1/model", headers=headers).json()["serving"]["engine"]


def test_disconnect_frees_the_row(server: str, http: httpx.Client) -> None:
    before = _engine(http)["tokens_generated"]
    body = {"prompt": "ROMEO:", "max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": 1, "stream": True}
    with (
        httpx.Client(base_url=server, timeout=30) as client,
        client.stream("POST", "/v1/generate", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert _engine(http)["running"] == 1
    # the client is gone: within a few decode steps (plus the proxy noticing) the row is free
    deadline = time.monotonic() + 5
    while (stats := _engine(http))["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["waiting"] == 0
    time.sleep(0.3)
    after = _engine(http)["tokens_generated"]
    assert after == stats["tokens_generated"] and after - before < MAX_NEW  # stopped, not run to the end


def test_auth_on_and_off(http: httpx.Client) -> None:
    body = {"prompt": "a", "max_new_tokens": 3}
    assert http.post("/v1/generate", json=body).status_code == 200  # main app: no auth
    for headers in ({}, {"Authorization": "Bearer wrong-key-xxxxxxx"}, {"Authorization": API_KEY}):
        r = http.post("/guarded/v1/generate", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/guarded/v1/models").status_code == 401
    assert http.get("/guarded/healthz").status_code == 200  # liveness stays open
    ok = http.post("/guarded/v1/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200


def test_backpressure_answers_429_with_retry_after(server: str) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "ROMEO:", "max_new_tokens": 400, "temperature": 1.0, "seed": 2}
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def call(_: int) -> None:
        with httpx.Client(base_url=server, timeout=60) as client:
            r = client.post("/guarded/v1/generate", json=body, headers=auth)
        with lock:
            responses.append(r)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
    busy = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "2" for r in busy)
    # the engine's queue answers in the JSON error shape; a burst beyond the replica's slots meets Serve's own
    # queue limit first (same status and Retry-After, a plain-text body)
    engine_busy = [r for r in busy if r.headers["content-type"] == "application/json"]
    assert engine_busy and all(r.json()["error"]["code"] == "server_busy" for r in engine_busy)
    with httpx.Client(base_url=server, timeout=60) as client:  # and it serves again once the burst is over
        assert (
            client.post(
                "/guarded/v1/generate", json={"prompt": "a", "max_new_tokens": 3}, headers=auth
            ).status_code
            == 200
        )


def test_a_request_that_can_never_fit_is_400_not_busy(server: str) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": ["a", "b"], "n": 2, "max_tokens": 2}  # 4 rows; the guarded replica holds 2 at once
    with httpx.Client(base_url=server, timeout=60) as client:
        r = client.post("/guarded/v1/completions", json=body, headers=auth)
        assert r.status_code == 400, r.text  # was 429 server_busy on an idle server, for ever
        error = r.json()["error"]
        assert error["param"] == "n" and error["code"] == "too_many_rows"
        assert "needs 4 rows (2 prompt(s) x n=2); this server takes at most 2 at once" in error["message"]
        body["n"] = 1
        assert client.post("/guarded/v1/completions", json=body, headers=auth).status_code == 200


def test_a_downloaded_model_leaves_no_copy_behind(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from lmplatform.serve import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts the download
    served = load_model(f"models:/{NAME}@best", trained["uri"], trained["experiment"])
    assert served.info["registered_model"] == NAME and served.info["name"] == NAME
    assert str(served.info["version"]) == "1" and served.info["checkpoint"] is None
    assert served.tokenizer.decode(served.tokenizer.encode("ROMEO:")) == "ROMEO:"
    assert list(tmp_path.iterdir()) == []  # Serve replicas never run atexit: nothing may wait for it


def test_streaming_completion_chunks_are_openai_shaped(http: httpx.Client) -> None:
    body = {"model": NAME, "prompt": ["a", "b"], "n": 2, "max_tokens": 6, "stream": True, "temperature": 0}
    events = _sse(http, "/v1/completions", body)
    finished = {e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]}
    assert finished == {0, 1, 2, 3}
    assert all(e["object"] == "text_completion" and e["model"] == NAME for e in events)
    assert json.dumps(events)  # plain JSON all the way
