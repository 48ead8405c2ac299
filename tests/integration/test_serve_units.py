"""lmplatform/serve.py without Ray: request parsing and the event stream's failure after its first byte.

What the HTTP tests in test_serve.py cannot provoke: an engine failure in the middle of a stream, which must
reach the client as an ``error`` event before ``[DONE]`` (never a silently truncated 200), freeing the rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lmplatform.serve import (
    Limits,
    LMServer,
    Metrics,
    RequestError,
    parse_completion,
    parse_generate,
    parse_json,
)

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
