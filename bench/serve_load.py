"""Load and soak for `lm serve`: latency, time to first token and throughput per batching mode and concurrency.

    python -m bench.serve_load                       # none, static, continuous at concurrency 1, 8, 32
    python -m bench.serve_load --modes continuous --concurrency 32 --requests 64
    python -m bench.serve_load --url http://127.0.0.1:8000   # a server already running (its own mode)
    python -m bench.serve_load --soak-seconds 300    # mixed valid and invalid requests, RSS at start and end

A bounded closed loop on 127.0.0.1 only: for each level, ``--warmup`` requests, then ``concurrency`` workers
send the next of ``--requests`` fixed requests as soon as their previous one is answered, until all were sent
or ``--time-cap`` seconds passed; nothing is retried, so 503/429 are counted, not hidden. Every request streams
(``/v1/completions``, ``stream_options.include_usage``), so time to first token is measured; the mix is short and
long ``max_tokens``, seeded, the same for every mode. The benchmark starts one `lm serve` per mode itself (its own
Ray; ``--set serve.KEY=VALUE`` changes its settings). Prints a table, writes bench/results/serve.json (or
serve-soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.procs import cmdline, descendants

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "static", "continuous")
PROMPTS = ("ROMEO:", "JULIET:\nO Romeo,", "First Citizen:\nBefore we proceed", "KING HENRY:", "To be")
# Targets from issue 12, checked at the highest concurrency measured (32 by default).
TARGET_VS_NONE = 4.0  # continuous output tokens/s >= 4x none
TARGET_VS_STATIC = 1.5  # and >= 1.5x static
TARGET_TTFT = 3.0  # continuous p50 time to first token at c=32 <= 3x that at c=1


@dataclass(frozen=True)
class RequestSpec:
    """One request of the mix: which prompt, how many tokens, which seed."""

    prompt: str
    max_tokens: int
    seed: int


@dataclass
class Sample:
    """What one request did: HTTP status (0: no response), latency, time to first token, tokens, error."""

    status: int
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def request_mix(n: int, short: int, long: int, long_fraction: float, seed: int = 0) -> list[RequestSpec]:
    """``n`` requests, ``round(n * long_fraction)`` of them long, in a seeded order with seeded prompts."""
    rng = random.Random(seed)
    n_long = round(n * long_fraction)
    lengths = [long] * n_long + [short] * (n - n_long)
    rng.shuffle(lengths)
    return [RequestSpec(rng.choice(PROMPTS), m, seed * 100_000 + i) for i, m in enumerate(lengths)]


def level_plans(
    levels: Sequence[int], requests: int, per_worker: int, short: int, long: int, long_fraction: float
) -> dict[int, list[RequestSpec]]:
    """The requests of each concurrency level: at least ``requests`` and ``per_worker`` per worker, so that the
    first burst (every worker sending at once) and the last stragglers are a small part of a level."""
    return {c: request_mix(max(requests, per_worker * c), short, long, long_fraction) for c in levels}


# --------------------------------------------------------------------------------------------------------------
# One request, streamed


def completion_body(spec: RequestSpec, model: str | None) -> dict[str, Any]:
    """A streamed OpenAI completions request for ``spec`` (sampled, seeded: the same tokens in every mode)."""
    body: dict[str, Any] = {
        "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.8, "seed": spec.seed,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if model:
        body["model"] = model
    return body


def http_session(timeout_s: float, connections: int = 100) -> aiohttp.ClientSession:
    """The load generator's HTTP client: aiohttp, whose HTTP parser is C. httpx (pure Python) cost so much CPU per
    request and chunk on this 2-core machine that at concurrency 32 most of the measured time to first token was
    the client's own (README "Serving under load")."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def send_streamed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Sample:
    """POST a streaming completion; latency to the end of the stream, TTFT to the first non-empty text."""
    start = time.perf_counter()
    ttft = None
    tokens = chunks = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return Sample(
                    response.status, time.perf_counter() - start, error=_error_text(await response.text())
                )
            done = False
            async for raw in response.content:  # one line at a time
                line = raw.decode()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Sample(
                        200, time.perf_counter() - start, ttft, tokens, f"stream error: {event['error']}"
                    )
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
                if event.get("usage"):
                    tokens = int(event["usage"].get("completion_tokens") or 0)
            if not done:
                return Sample(200, time.perf_counter() - start, ttft, tokens, "stream ended without [DONE]")
    except (
        aiohttp.ClientError,
        asyncio.TimeoutError,
        json.JSONDecodeError,
        ValueError,
    ) as exc:  # not TimeoutError on 3.10
        return Sample(0, time.perf_counter() - start, ttft, tokens, f"{type(exc).__name__}: {exc}"[:300])
    return Sample(200, time.perf_counter() - start, ttft, tokens or chunks)


def _error_text(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
        return str(json.loads(text)["error"]["message"])[:300]
    return text[:300]


# --------------------------------------------------------------------------------------------------------------
# The bounded closed loop


@dataclass
class LevelResult:
    """The samples of one concurrency level and how long it ran."""

    concurrency: int
    samples: list[Sample]
    wall_s: float
    planned: int
    capped: bool  # the time cap stopped it before every planned request was sent
    loop_lags: list[float] = field(default_factory=list)  # this client's own event-loop delays (loop_lag)

    def summary(self) -> dict[str, Any]:
        """p50/p95/p99 latency and TTFT of the successful requests, requests/s, output tokens/s, errors."""
        ok = [s for s in self.samples if s.ok]
        lat = [s.latency_s for s in ok]
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        errors = Counter(str(s.status) if s.status else "no response" for s in self.samples if not s.ok)
        out: dict[str, Any] = {
            "concurrency": self.concurrency, "planned": self.planned, "sent": len(self.samples), "ok": len(ok),
            "errors": dict(errors), "capped": self.capped, "wall_s": self.wall_s,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s > 0 else 0.0,
            "output_tokens_per_s": sum(s.tokens for s in ok) / self.wall_s if self.wall_s > 0 else 0.0,
            "output_tokens": sum(s.tokens for s in ok),
        }  # fmt: skip
        for q in (50, 95, 99):
            out[f"latency_p{q}_s"] = percentile(lat, q)
            out[f"ttft_p{q}_s"] = percentile(ttft, q)
        for q in (50, 95):  # how late this process's own event loop ran: part of every latency above
            out[f"client_lag_p{q}_s"] = percentile(self.loop_lags, q)
        first_errors = [s.error for s in self.samples if s.error][:3]
        if first_errors:
            out["first_errors"] = first_errors
        return out


async def closed_loop(
    send: Callable[[RequestSpec], Awaitable[Sample]],
    specs: Sequence[RequestSpec],
    concurrency: int,
    time_cap_s: float,
) -> LevelResult:
    """``concurrency`` workers, each sending the next spec when its previous request is answered; no new
    request after ``time_cap_s`` (those in flight finish, bounded by the client's timeout)."""
    queue = iter(enumerate(specs))
    samples: list[Sample | None] = [None] * len(specs)
    start = time.perf_counter()
    capped = False
    done_sending = asyncio.Event()
    lags = asyncio.ensure_future(loop_lag(done_sending))

    async def worker() -> None:
        nonlocal capped
        for i, spec in queue:  # one shared iterator: each spec is sent exactly once
            if time.perf_counter() - start > time_cap_s:
                capped = True
                return
            samples[i] = await send(spec)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    wall = time.perf_counter() - start
    done_sending.set()
    done = [s for s in samples if s is not None]
    return LevelResult(concurrency, done, wall, len(specs), capped, await lags)


async def loop_lag(stop: asyncio.Event, every: float = 0.005) -> list[float]:
    """How late each ``every``-second sleep of this event loop wakes up, until ``stop``: while the loop is busy
    parsing other streams, a first token that has arrived waits unread, so this lag is part of the TTFT and
    latency measured here, not the server's."""
    lags = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(max(0.0, time.perf_counter() - t0 - every))
    return lags


async def run_levels(
    url: str, model: str | None, plans: dict[int, Sequence[RequestSpec]], warmup: int, time_cap_s: float,
    timeout_s: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Warm up, then each concurrency level over its planned specs; one summary dict per level."""
    levels = list(plans)
    async with http_session(timeout_s, max(levels) + 4) as client:

        async def send(spec: RequestSpec) -> Sample:
            return await send_streamed(client, url, completion_body(spec, model))

        warm = request_mix(warmup, 8, 8, 0.0, seed=99)
        await closed_loop(send, warm, min(4, max(levels)), time_cap_s)
        rows = []
        for c, specs in plans.items():
            result = await closed_loop(send, specs, c, time_cap_s)
            rows.append(result.summary())
            print(f"  c={c:<3} {_line(rows[-1])}", flush=True)
        return rows


def _line(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    return (
        f"ok {r['ok']}/{r['planned']}{' (time cap)' if r['capped'] else ''}  {r['output_tokens_per_s']:.0f} tok/s  "
        f"{r['requests_per_s']:.2f} req/s  latency p50/p95/p99 {ms(r['latency_p50_s'])}/{ms(r['latency_p95_s'])}/"
        f"{ms(r['latency_p99_s'])} ms  TTFT p50/p95 {ms(r['ttft_p50_s'])}/{ms(r['ttft_p95_s'])} ms  errors {errors}"
        f"  client loop lag p50/p95 {ms(r.get('client_lag_p50_s'))}/{ms(r.get('client_lag_p95_s'))} ms"
    )


# --------------------------------------------------------------------------------------------------------------
# Soak: mixed valid and invalid requests for a while


# Each must get a 4xx and leave the server serving: (path, raw body bytes or a JSON-able body).
INVALID_REQUESTS: tuple[tuple[str, Any], ...] = (
    ("/v1/completions", {"max_tokens": 8}),  # no prompt
    ("/v1/completions", {"prompt": 5, "max_tokens": 8}),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**9}),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "a", "top_k": -3}),
    ("/v1/completions", {"prompt": "a", "model": "no-such-model"}),
    ("/v1/completions", b'{"prompt": "a", '),  # invalid JSON
    ("/v1/completions", b'{"prompt": "\xff\xfe"}'),  # invalid UTF-8
    ("/v1/completions", b'{"prompt": "' + b"a" * 200_000 + b'"}'),  # over the body limit
    ("/v1/generate", {"prompt": "a", "bogus": 1}),  # unknown field on the native endpoint
    ("/v1/generate", {"max_new_tokens": 4}),
)


@dataclass
class SoakTally:
    """Counts of the soak: valid requests and how they failed, invalid ones and what they got."""

    valid: int = 0
    valid_failed: int = 0
    invalid: int = 0
    invalid_not_4xx: int = 0
    status_5xx: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(self, valid: bool, status: int, error: str | None) -> None:
        self.statuses[str(status) if status else "no response"] += 1
        if status >= 500:
            self.status_5xx += 1
        if valid:
            self.valid += 1
            if status != 200 or error is not None:
                self.valid_failed += 1
                self.failures.append(f"valid -> {status}: {error}"[:300])
        else:
            self.invalid += 1
            if not 400 <= status < 500:
                self.invalid_not_4xx += 1
                self.failures.append(f"invalid -> {status}: {error}"[:300])


async def soak(
    url: str, model: str | None, seconds: float, concurrency: int, invalid_fraction: float, timeout_s: float,
    rss: Callable[[], int | None], sample_every_s: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    """``concurrency`` workers send a seeded mix of valid (streamed or not, both endpoints) and invalid
    requests for ``seconds``; RSS sampled every ``sample_every_s``."""
    tally = SoakTally()
    rss_series: list[tuple[float, int | None]] = [(0.0, rss())]
    start = time.perf_counter()
    async with http_session(timeout_s) as client:

        async def worker(w: int) -> None:
            rng = random.Random(w)
            i = 0
            while time.perf_counter() - start < seconds:
                i += 1
                if rng.random() < invalid_fraction:
                    path, body = rng.choice(INVALID_REQUESTS)
                    status, error = await _post(client, url + path, body)
                    tally.record(False, status, error)
                    continue
                spec = RequestSpec(rng.choice(PROMPTS), rng.choice((4, 16, 64)), w * 1_000_000 + i)
                kind = rng.randrange(3)
                if kind == 0:
                    sample = await send_streamed(client, url, completion_body(spec, model))
                    status, error = sample.status, sample.error
                elif kind == 1:
                    body = {**completion_body(spec, model), "stream": False}
                    del body["stream_options"]
                    status, error = await _post(client, f"{url}/v1/completions", body)
                else:
                    body = {"prompt": spec.prompt, "max_new_tokens": spec.max_tokens, "seed": spec.seed}
                    status, error = await _post(client, f"{url}/v1/generate", body)
                tally.record(True, status, error)

        async def sampler() -> None:
            while time.perf_counter() - start < seconds:
                await asyncio.sleep(min(sample_every_s, max(0.0, seconds - (time.perf_counter() - start))))
                rss_series.append((time.perf_counter() - start, rss()))

        await asyncio.gather(sampler(), *(worker(w) for w in range(concurrency)))
    rss_series.append((time.perf_counter() - start, rss()))
    known = [r for _, r in rss_series if r is not None]
    return {
        "seconds": time.perf_counter() - start, "concurrency": concurrency, "valid": tally.valid,
        "valid_failed": tally.valid_failed, "invalid": tally.invalid, "invalid_not_4xx": tally.invalid_not_4xx,
        "status_5xx": tally.status_5xx, "statuses": dict(tally.statuses), "failures": tally.failures[:20],
        "rss_start_bytes": known[0] if known else None, "rss_end_bytes": known[-1] if known else None,
        "rss_max_bytes": max(known) if known else None, "rss_series": rss_series,
    }  # fmt: skip


async def _post(client: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, str | None]:
    """POST JSON (or raw bytes as JSON); (status, error or None). Status 0: no response."""
    try:
        if isinstance(body, bytes):
            request = client.post(url, data=body, headers={"Content-Type": "application/json"})
        else:
            request = client.post(url, json=body)
        async with request as response:
            text = await response.text(errors="replace")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"[:300]
    return response.status, None if response.status == 200 else _error_text(text)


# --------------------------------------------------------------------------------------------------------------
# The server under test: `lm serve` in its own process group


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def lm_serve(
    config: str, mode: str, model: str | None, settings: Sequence[str], log_path: Path, start_timeout_s: float
) -> Iterator[tuple[str, int]]:
    """Start ``lm serve CONFIG serve.batching=MODE ...`` on a free 127.0.0.1 port; yield (url, pid); stop it."""
    port = free_port()
    pid_file = Path(tempfile.mkdtemp(prefix="lmlab-bench-")) / "serve.pid"
    cmd = [
        sys.executable, "-m", "lmplatform", "serve", config, f"serve.batching={mode}", f"serve.pid_file={pid_file}",
        *settings, "--host", "127.0.0.1", "--port", str(port), *(["--model", model] if model else []),
    ]  # fmt: skip
    log = log_path.open("w")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never someone else's cluster
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, start_timeout_s, log_path)
        yield url, proc.pid
    finally:
        stop_process_group(proc)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll /healthz until 200; fail with the server's last log lines if it exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lm serve exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"lm serve did not answer {url}/healthz within {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM to lm serve alone (it shuts Serve and its Ray down), then SIGKILL whatever is left of its group.

    Not SIGTERM to the whole group: Ray's GCS and raylet would die under lm serve's own clean shutdown, which
    then waits on them.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # its own session: only what it started
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def replica_rss(server_pid: int) -> int | None:
    """Resident bytes of the Serve replica (the process under ``server_pid`` whose title names LMServer) and of
    its own children (the decoding process of ``serve.engine=process``).

    Read from /proc (Linux), so it needs no psutil; None when the replica is not found.
    """
    for pid in descendants(server_pid):
        title = cmdline(pid)
        if "ServeReplica" in title and "LMServer" in title:
            sizes = [_rss(p) for p in (pid, *descendants(pid))]
            return sum(s for s in sizes if s is not None) if sizes[0] is not None else None
    return None


def _rss(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    return None


def served_model_name(url: str) -> str | None:
    """The id /v1/models lists (sent as ``model``), or None to let the server pick."""
    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
        return httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]
    return None


def _tail(path: Path, lines: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --------------------------------------------------------------------------------------------------------------
# Report


def targets(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Issue 12's targets at the highest common concurrency (and TTFT against c=1), where measured."""
    out: dict[str, Any] = {}
    cont = {r["concurrency"]: r for r in rows.get("continuous", [])}
    if not cont:
        return out
    top = max(cont)
    for other, need in (("none", TARGET_VS_NONE), ("static", TARGET_VS_STATIC)):
        base = {r["concurrency"]: r for r in rows.get(other, [])}.get(top)
        if base and base["output_tokens_per_s"] > 0:
            ratio = cont[top]["output_tokens_per_s"] / base["output_tokens_per_s"]
            out[f"continuous_vs_{other}_tokens_per_s_c{top}"] = {
                "ratio": ratio,
                "target": need,
                "met": ratio >= need,
            }
    if 1 in cont and top != 1 and cont[1]["ttft_p50_s"] and cont[top]["ttft_p50_s"] is not None:
        ratio = cont[top]["ttft_p50_s"] / cont[1]["ttft_p50_s"]
        out[f"continuous_ttft_p50_c{top}_vs_c1"] = {
            "ratio": ratio,
            "target": TARGET_TTFT,
            "met": ratio <= TARGET_TTFT,
        }
    return out


def print_table(rows: dict[str, list[dict[str, Any]]]) -> None:
    """One line per (mode, concurrency)."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    header = [
        "mode",
        "c",
        "ok",
        "errors",
        "req/s",
        "tok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "TTFT p50",
        "TTFT p95",
        "client lag p50/p95",
    ]
    table = [header]
    for mode, levels in rows.items():
        for r in levels:
            errors = ",".join(f"{k}x{v}" for k, v in r["errors"].items()) or "-"
            table.append([
                mode, str(r["concurrency"]), f"{r['ok']}/{r['planned']}", errors, f"{r['requests_per_s']:.2f}",
                f"{r['output_tokens_per_s']:.0f}", ms(r["latency_p50_s"]), ms(r["latency_p95_s"]),
                ms(r["latency_p99_s"]), ms(r["ttft_p50_s"]), ms(r["ttft_p95_s"]),
                f"{ms(r.get('client_lag_p50_s'))}/{ms(r.get('client_lag_p95_s'))}",
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


# --------------------------------------------------------------------------------------------------------------
# Entry point


def ensure_model(model: str | None, config: str) -> str | None:
    """``model`` as given; else the experiment's @best if registered; else train the tiny preset first."""
    if model:
        return model
    from lmplatform.config import load_platform_config
    from lmplatform.models import default_model_ref, is_registered

    cfg, pcfg = load_platform_config(config, [])
    ref = default_model_ref(cfg.name)
    if is_registered(ref, pcfg.tracking.uri or ""):
        return None  # lm serve's default is this very reference
    print(f"{ref} is not registered: training the tiny preset first (lm train --local experiments/tiny.yaml)")
    subprocess.run(
        [sys.executable, "-m", "lmplatform", "train", "--local", "experiments/tiny.yaml", "--no-sample"],
        cwd=REPO, check=True,
    )  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the load levels (or the soak) against `lm serve`, print a table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="experiments/serve.yaml", help="the lm serve config (default: %(default)s)"
    )
    p.add_argument(
        "--model", help="what lm serve loads (default: the experiment's @best; trained if missing)"
    )
    p.add_argument("--url", help="measure a server already running here instead of starting one per mode")
    p.add_argument("--modes", default=",".join(MODES), help="batching modes (default: %(default)s)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrency levels (default: %(default)s)")
    p.add_argument(
        "--requests", type=int, default=96, help="requests per level, at least (default: %(default)s)"
    )
    p.add_argument(
        "--per-worker", type=int, default=8,
        help="and at least this many per concurrent worker, so a level is mostly steady load, not its first "
        "burst and last stragglers (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=8, help="requests before the levels (default: %(default)s)")
    p.add_argument(
        "--short", type=int, default=16, help="max_tokens of a short request (default: %(default)s)"
    )
    p.add_argument(
        "--long", type=int, default=128, help="max_tokens of a long request (default: %(default)s)"
    )
    p.add_argument("--long-fraction", type=float, default=0.25, help="share of long requests (%(default)s)")
    p.add_argument("--time-cap", type=float, default=180.0, help="seconds per level before it stops sending")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument(
        "--start-timeout", type=float, default=180.0, help="seconds for lm serve to become healthy"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="serve.KEY=VALUE",
        help="lm serve override, repeatable (default: serve.max_batch_size=32 serve.max_queued_requests=64)",
    )  # fmt: skip
    p.add_argument("--soak-seconds", type=float, default=0.0, help="run the soak for this long instead")
    p.add_argument("--soak-mode", default="continuous", choices=MODES)
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--invalid-fraction", type=float, default=0.3, help="share of invalid soak requests")
    p.add_argument("--name", default=None, help="results file name (default: serve, or serve-soak)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not levels or min(levels) < 1 or args.requests < 1 or args.per_worker < 0:
        p.error(
            f"--modes from {MODES}, --concurrency and --requests positive (got modes {modes}, levels {levels})"
        )
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("--url must be on this machine (127.0.0.1): the benchmark loads only local servers")
    settings = args.set or ["serve.max_batch_size=32", "serve.max_queued_requests=64"]
    model = None if args.url else ensure_model(args.model, args.config)
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "config": args.config, "model": args.model, "settings": settings, "requests": args.requests,
        "per_worker": args.per_worker,
        "warmup": args.warmup, "mix": {"short": args.short, "long": args.long, "long_fraction": args.long_fraction},
        "time_cap_s": args.time_cap,
    }  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="lmlab-bench-serve-"))
    if args.soak_seconds > 0:
        results["soak"] = _run_soak(args, model, settings, logs)
        _print_soak(results["soak"])
        name = args.name or "serve-soak"
    else:
        plans = level_plans(levels, args.requests, args.per_worker, args.short, args.long, args.long_fraction)
        rows: dict[str, list[dict[str, Any]]] = {}
        for mode in ["as-is"] if args.url else modes:
            print(f"{mode}: {'measuring ' + args.url if args.url else 'starting lm serve'}", flush=True)
            with contextlib.ExitStack() as stack:
                url = (
                    args.url
                    or stack.enter_context(
                        lm_serve(args.config, mode, model, settings, logs / f"{mode}.log", args.start_timeout)
                    )[0]
                )
                run = run_levels(url, served_model_name(url), plans, args.warmup, args.time_cap, args.timeout)
                rows[mode] = asyncio.run(run)
        results["levels"] = rows
        results["targets"] = targets(rows)
        print_table(rows)
        for key, t in results["targets"].items():
            print(f"{key}: {t['ratio']:.2f} (target {'>=' if 'ttft' not in key else '<='} {t['target']}) "
                  f"{'met' if t['met'] else 'NOT met'}")  # fmt: skip
        name = args.name or "serve"
    results["loadavg_after"] = os.getloadavg()
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nserver logs in {logs}\nwrote {out}")
    return 0


def _run_soak(
    args: argparse.Namespace, model: str | None, settings: Sequence[str], logs: Path
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, None
        else:
            log = logs / "soak.log"
            url, pid = stack.enter_context(
                lm_serve(args.config, args.soak_mode, model, settings, log, args.start_timeout)
            )
        name = served_model_name(url)
        warm = request_mix(args.warmup, 8, 8, 0.0, seed=99)

        async def go() -> dict[str, Any]:
            async with http_session(args.timeout) as client:
                for spec in warm:  # the replica's memory after warm-up is the baseline
                    await send_streamed(client, url, completion_body(spec, name))
            return await soak(
                url, name, args.soak_seconds, args.soak_concurrency, args.invalid_fraction, args.timeout,
                (lambda: replica_rss(pid)) if pid else (lambda: None),
            )  # fmt: skip

        result = asyncio.run(go())
        result["mode"] = "as-is" if args.url else args.soak_mode
        return result


def _print_soak(s: dict[str, Any]) -> None:
    def mib(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**20:.1f} MiB"

    print(
        f"\nsoak {s['seconds']:.0f} s, {s['mode']} batching, concurrency {s['concurrency']}: "
        f"{s['valid']} valid requests ({s['valid_failed']} failed), {s['invalid']} invalid "
        f"({s['invalid_not_4xx']} not answered 4xx), {s['status_5xx']} 5xx; statuses {s['statuses']}\n"
        f"replica RSS start {mib(s['rss_start_bytes'])}, end {mib(s['rss_end_bytes'])}, max {mib(s['rss_max_bytes'])}"
    )
    for failure in s["failures"][:5]:
        print(f"  {failure}")


if __name__ == "__main__":
    raise SystemExit(main())
