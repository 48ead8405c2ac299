"""bench/serve_load.py's own logic against a fake streaming server in this process: percentiles, the request
mix, the bounded closed loop, counting by status, the soak's tally and the targets check. No Ray, no model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench.serve_load import (
    LevelResult,
    RequestSpec,
    Sample,
    SoakTally,
    closed_loop,
    completion_body,
    http_session,
    level_plans,
    percentile,
    replica_rss,
    request_mix,
    run_levels,
    send_streamed,
    soak,
    targets,
)


class FakeServer(BaseHTTPRequestHandler):
    """Streams max_tokens one-character chunks (sleeping ``delay`` each), then usage and [DONE]; a prompt
    "busy" gets 503, "broken" an error event after the first chunk; /v1/generate answers JSON."""

    delay = 0.0
    active = 0
    peak = 0
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._json(200, {"object": "list", "data": [{"id": "fake"}]})

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if len(raw) > 65536:
            return self._json(413, {"error": {"message": "body too large"}})
        try:
            body = json.loads(raw)
        except ValueError:  # also invalid UTF-8
            return self._json(400, {"error": {"message": "invalid JSON"}})
        if problem := _invalid(self.path, body):
            return self._json(400, {"error": {"message": problem}})
        if body["prompt"] == "busy":
            return self._json(503, {"error": {"message": "queue full"}})
        if not body.get("stream"):
            return self._json(200, {"text": "x"})
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(body["max_tokens"]):
                time.sleep(self.delay)
                self._event({"choices": [{"index": 0, "text": "a", "finish_reason": None}], "usage": None})
                if body["prompt"] == "broken":
                    self._event({"error": {"message": "engine died"}})
                    return
            self._event({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
            self.wfile.write(b"data: [DONE]\n\n")
        finally:
            with cls.lock:
                cls.active -= 1

    def _event(self, event: dict) -> None:
        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _invalid(path: str, body: dict) -> str | None:
    """What the real server refuses (a subset): the soak's invalid requests all hit one of these."""
    allowed = {
        "prompt",
        "max_tokens",
        "max_new_tokens",
        "temperature",
        "seed",
        "stream",
        "stream_options",
        "model",
    }
    if path == "/v1/generate" and set(body) - allowed:
        return "unknown field"
    tokens = body.get("max_tokens", body.get("max_new_tokens", 16))
    temperature, top_p, top_k = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", 0)
    checks = (
        (not isinstance(body.get("prompt"), str), "prompt is required"),
        (not 1 <= tokens <= 1024, "max_tokens"),
        (not temperature >= 0, "temperature"),  # NaN too
        (not 0 < top_p <= 1, "top_p"),
        (top_k < 0, "top_k"),
        (body.get("model") not in (None, "fake"), "model"),
    )
    return next((message for bad, message in checks if bad), None)


@pytest.fixture
def fake() -> Iterator[str]:
    FakeServer.delay, FakeServer.active, FakeServer.peak = 0.0, 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_percentile_interpolates_like_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_the_request_mix_is_seeded_and_has_the_asked_share_of_long_requests() -> None:
    mix = request_mix(96, 16, 128, 0.25)
    assert mix == request_mix(96, 16, 128, 0.25)  # the same requests for every mode
    assert sum(s.max_tokens == 128 for s in mix) == 24 and sum(s.max_tokens == 16 for s in mix) == 72
    assert len({s.seed for s in mix}) == 96  # every request its own seed
    assert [s.max_tokens for s in mix[:24]] != [128] * 24  # interleaved, not long ones first
    body = completion_body(mix[0], "m")
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["model"] == "m"


def test_a_level_sends_every_request_once_at_the_asked_concurrency_and_counts_errors(fake: str) -> None:
    FakeServer.delay = 0.005
    specs = [RequestSpec("busy" if i % 5 == 0 else "ROMEO:", 4, i) for i in range(20)]

    async def go() -> LevelResult:
        async with http_session(10) as client:
            return await closed_loop(
                lambda s: send_streamed(client, fake, completion_body(s, None)), specs, 3, 30
            )

    result = asyncio.run(go())
    summary = result.summary()
    assert summary["sent"] == 20 and summary["ok"] == 16 and summary["errors"] == {"503": 4}
    assert not summary["capped"] and summary["output_tokens"] == 16 * 4
    assert FakeServer.peak <= 3  # never more than `concurrency` in flight
    assert all(s.ttft_s is not None and 0 < s.ttft_s <= s.latency_s for s in result.samples if s.ok)
    assert summary["latency_p50_s"] <= summary["latency_p95_s"] <= summary["latency_p99_s"]
    assert summary["output_tokens_per_s"] == pytest.approx(64 / summary["wall_s"])
    assert "queue full" in summary["first_errors"][0]


def test_a_level_reports_how_late_its_own_event_loop_ran() -> None:
    async def blocking_send(
        spec: RequestSpec,
    ) -> Sample:  # parses for 30 ms without yielding, like a busy client
        time.sleep(0.03)
        await asyncio.sleep(0.001)
        return Sample(200, 0.031, 0.001, 1)

    result = asyncio.run(closed_loop(blocking_send, request_mix(10, 1, 1, 0.0), 2, 30))
    summary = result.summary()
    assert (
        len(result.loop_lags) >= 5 and summary["client_lag_p95_s"] >= 0.02
    )  # the probe waited out the blocks
    assert summary["client_lag_p50_s"] <= summary["client_lag_p95_s"]


def test_the_time_cap_stops_a_level_by_itself(fake: str) -> None:
    FakeServer.delay = 0.05  # 0.2 s a request: 100 requests one at a time would take 20 s
    specs = request_mix(100, 4, 4, 0.0)

    async def go() -> LevelResult:
        async with http_session(10) as client:
            return await closed_loop(
                lambda s: send_streamed(client, fake, completion_body(s, None)), specs, 1, 0.5
            )

    start = time.perf_counter()
    result = asyncio.run(go())
    assert time.perf_counter() - start < 2.0
    assert result.capped and 1 <= len(result.samples) < 10 and all(s.ok for s in result.samples)


def test_stream_errors_and_dead_servers_are_failures_not_tokens(fake: str) -> None:
    async def go() -> tuple[Sample, Sample]:
        async with http_session(5) as client:
            broken = await send_streamed(client, fake, completion_body(RequestSpec("broken", 5, 0), None))
            dead = await send_streamed(
                client, "http://127.0.0.1:9", completion_body(RequestSpec("a", 5, 0), None)
            )
            return broken, dead

    broken, dead = asyncio.run(go())
    assert broken.status == 200 and not broken.ok and "engine died" in broken.error
    assert dead.status == 0 and not dead.ok


def test_run_levels_warms_up_then_measures_each_level(fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    plans = level_plans([1, 4], 8, 3, 2, 6, 0.5)  # c=4: 3 per worker, 12 requests
    assert [len(p) for p in plans.values()] == [8, 12] and plans[1] == request_mix(8, 2, 6, 0.5)
    rows = asyncio.run(run_levels(fake, "fake", plans, 2, 30, 10))
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert [(r["ok"], r["output_tokens"]) for r in rows] == [(8, 4 * 2 + 4 * 6), (12, 6 * 2 + 6 * 6)]
    assert "c=4" in capsys.readouterr().out


def test_the_soak_counts_valid_failures_invalid_answers_and_5xx(fake: str) -> None:
    tally = SoakTally()
    tally.record(True, 200, None)
    tally.record(True, 503, "queue full")
    tally.record(False, 400, "bad")
    tally.record(False, 500, "boom")
    assert (tally.valid, tally.valid_failed, tally.invalid, tally.invalid_not_4xx, tally.status_5xx) == (
        2, 1, 2, 1, 2,
    )  # fmt: skip

    result = asyncio.run(soak(fake, None, 1.0, 2, 0.5, 5, lambda: 1234, sample_every_s=0.3))
    assert result["valid"] > 0 and result["invalid"] > 0 and result["status_5xx"] == 0
    assert result["invalid_not_4xx"] == 0 and result["valid_failed"] == 0  # the fake refuses all of them
    assert result["rss_start_bytes"] == result["rss_end_bytes"] == 1234 and len(result["rss_series"]) >= 3
    assert result["seconds"] < 5


def test_targets_compare_continuous_with_the_other_modes_at_the_top_concurrency() -> None:
    def row(c: int, tps: float, ttft: float) -> dict:
        return {"concurrency": c, "output_tokens_per_s": tps, "ttft_p50_s": ttft}

    rows = {
        "none": [row(1, 100, 0.01), row(32, 100, 2.0)],
        "static": [row(1, 100, 0.01), row(32, 300, 0.5)],
        "continuous": [row(1, 100, 0.01), row(32, 500, 0.02)],
    }
    t = targets(rows)
    assert t["continuous_vs_none_tokens_per_s_c32"] == {"ratio": 5.0, "target": 4.0, "met": True}
    assert t["continuous_vs_static_tokens_per_s_c32"]["ratio"] == pytest.approx(5 / 3)
    assert t["continuous_ttft_p50_c32_vs_c1"] == {"ratio": pytest.approx(2.0), "target": 3.0, "met": True}


def test_replica_rss_finds_the_replica_among_the_servers_descendants_and_counts_its_children() -> None:
    """Ray titles a replica's worker ray::ServeReplica:<app>:LMServer; here a child that says so in its argv, with
    a child of its own holding 64 MiB, as the decoding process does."""
    decoder = "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    replica = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {decoder!r}]); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", replica, "ray::ServeReplica:lmlab:LMServer"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while ((rss := replica_rss(os.getpid())) or 0) < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has exec'd and its own child has touched its memory
        assert rss is not None and 64 << 20 < rss < 1 << 31
        assert replica_rss(child.pid) is None  # no replica under it
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
