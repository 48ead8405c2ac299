"""Ray Serve: a trained model behind HTTP, OpenAI-compatible, streaming, batched, safe under bad input and load.

One deployment (:class:`LMServer`, a FastAPI ingress) per replica loads the model (``lmplatform.models``) and
decodes with :mod:`lmplatform.engine`: ``serve.batching: continuous`` (iteration-level batching, the default),
``none`` (one request at a time) or ``static`` (Ray's ``@serve.batch`` around ``decode_static``).

Endpoints: ``POST /v1/completions`` (OpenAI completions), ``POST /v1/generate`` (native), ``GET /v1/models``,
``GET /v1/model``, ``GET /healthz`` and ``GET /metrics`` (Prometheus text, this replica's counters). Every bad
request gets a 4xx with an OpenAI-style ``{"error": {"message", "type", "param", "code"}}``. ``lm serve`` runs it
in the foreground (:func:`serve_foreground`); ``lm serve --stop`` stops one started elsewhere (:func:`stop_server`).
``GET /`` is the playground: a page to try the model in a browser (``playground.html``, shipped as package data).
"""

# No `from __future__ import annotations` here: FastAPI resolves a string annotation (`request: Request`) in the
# endpoint's globals, and serve.ingress's copy of the class keeps only the globals its code uses.

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmplatform.config import ServeConfig
from lmplatform.train import PlatformError, normal_worker_priority

log = logging.getLogger("lmplatform.serve")
API_KEY_ENV = "LMLAB_API_KEY"
_MAX_LOGPROBS = 5  # OpenAI's limit for the completions endpoint
_MAX_SEED = 2**63 - 1
_MAX_PROMPTS = 32  # prompts in one completions request (each times n)
_SSE = "text/event-stream"
# A streamed request gets its first text at once, then at most one chunk per this long (the text of every decode
# step meanwhile, merged: RequestStream's interval). Every chunk is a Ray streaming message from the replica to the
# proxy (slow at high concurrency, ray#52745) and an SSE event the client parses; per decode step, that work grew
# with the batch and took the CPU the batch needed.
_STREAM_FLUSH_S = 0.1
# Serve restarts a replica after 3 failed health checks in a row (LMServer.check_health: its decoding engine
# stopped); Serve's default period is 10 s.
_HEALTH_CHECK_PERIOD_S = 2.0
# OpenAI fields this server accepts only at their neutral value (it has no penalties, suffixes or best_of).
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "suffix": None, "logit_bias": None}
_COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
    "stream_options", "logprobs", "echo", "user", *_NEUTRAL,
}  # fmt: skip
_GENERATE_FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream"}


class ServeError(PlatformError):
    """The server cannot be started, stopped or reached as asked (port in use, nothing to stop)."""


# --------------------------------------------------------------------------------------------------------------
# Errors and request parsing (pure functions: no Ray, no model)


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-style JSON error with ``status``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_value",
        status: int = 400,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` as OpenAI and vLLM send it."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (from ``serve:``; ``max_prompt_tokens`` defaults to the block size)."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_n: int
    max_stop: int
    max_body_bytes: int
    # prompts x n that one replica holds at once (None: no bound, static batching)
    max_rows: int | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: prompts (text or token ids), sampling settings and how to answer."""

    prompts: list[str | list[int]]
    sampling: dict[str, Any]  # SamplingParams keyword arguments, without the seed
    seed: int | None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    model: str | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; invalid UTF-8, invalid JSON or a non-object -> 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})", None, "invalid_utf8"
        ) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the body is not valid JSON ({exc})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    return data


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", str: "string", list: "array", dict: "object"}.get(type(value), "number")
    )


def _int(
    data: dict[str, Any], name: str, default: int | None, lo: int, hi: int, hi_note: str = ""
) -> int | None:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(
            f"{name} must be an integer, got {_type_name(value)} {value!r}", name, "invalid_type"
        )
    if value < lo:
        raise RequestError(f"{name}={value} is too small: it must be >= {lo}", name)
    if value > hi:
        raise RequestError(f"{name}={value} is too large: it must be <= {hi}{hi_note}", name)
    return value


def _float(data: dict[str, Any], name: str, default: float | None) -> float | None:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(
            f"{name} must be a number, got {_type_name(value)} {value!r}", name, "invalid_type"
        )
    if not math.isfinite(value):
        raise RequestError(f"{name}={value} is not allowed: it must be a finite number", name)
    return float(value)


def _bool(data: dict[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(
            f"{name} must be true or false, got {_type_name(value)} {value!r}", name, "invalid_type"
        )
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise RequestError(
            f"{param} must be a string, got {_type_name(value)} {value!r:.40}", param, "invalid_type"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} holds a lone surrogate (not valid Unicode text)", param) from None
    return value


def _sampling(
    data: dict[str, Any], limits: Limits, tokens_key: str, default_tokens: int, defaults: dict
) -> dict:
    """Temperature, top_k, top_p, stop and the token budget, checked; keyword arguments for SamplingParams."""
    max_new = _int(data, tokens_key, default_tokens, 1, limits.max_new_tokens, " (serve.max_new_tokens)")
    temperature = _float(data, "temperature", defaults.get("temperature", 1.0))
    if temperature is not None and temperature < 0:
        raise RequestError(
            f"temperature={temperature} is not allowed: it must be >= 0 (0 = greedy)", "temperature"
        )
    top_p = _float(data, "top_p", defaults.get("top_p"))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p={top_p} is not allowed: it must be in (0, 1]", "top_p")
    top_k = _int(data, "top_k", defaults.get("top_k"), 0, 2**31 - 1)
    stop = data.get("stop")
    stops: tuple[str, ...] = ()
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list):
            raise RequestError(
                f"stop must be a string or an array of strings, got {_type_name(stop)}",
                "stop",
                "invalid_type",
            )
        if len(items) > limits.max_stop:
            raise RequestError(
                f"stop has {len(items)} strings: at most {limits.max_stop} are allowed (serve.max_stop)",
                "stop",
            )
        for item in items:
            if _text(item, "stop") == "":
                raise RequestError("stop strings must not be empty", "stop")
        stops = tuple(items)
    return {
        "max_new_tokens": max_new, "temperature": temperature, "top_k": top_k or None,
        "top_p": None if top_p in (None, 1.0) else top_p, "stop": stops,
    }  # fmt: skip


def _seed(data: dict[str, Any]) -> int | None:
    return _int(data, "seed", None, 0, _MAX_SEED)


def _prompts(value: Any, vocab_size: int) -> list[str | list[int]]:
    """A prompt as OpenAI takes it: a string, an array of strings, token ids or arrays of token ids."""
    if value is None:
        raise RequestError("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(value, str):
        return [_text(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise RequestError(
            f"prompt must be a string or a non-empty array (of strings or token ids), got {_type_name(value)}",
            "prompt",
            "invalid_type",
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]
    out: list[str | list[int]] = []
    for item in value:
        if isinstance(item, list):
            if not item or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in item
            ):
                raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
            out.append(item)
        else:
            out.append(_text(item, "prompt"))
    return out


def _unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise RequestError(
            f"unknown field {extra[0]!r} for {where} (allowed: {', '.join(sorted(allowed))})",
            extra[0],
            "unknown_field",
        )


def parse_completion(data: dict[str, Any], limits: Limits, vocab_size: int) -> ParsedRequest:
    """POST /v1/completions: the OpenAI completions shape (plus ``top_k``), validated against ``limits``."""
    _unknown(data, _COMPLETION_FIELDS, "/v1/completions")
    for name, neutral in _NEUTRAL.items():
        value = data.get(name)
        if value is not None and value != neutral and not (name == "logit_bias" and value == {}):
            raise RequestError(
                f"{name}={value!r} is not supported by this server", name, "unsupported_parameter"
            )
    model = data.get("model")
    if model is not None:
        _text(model, "model")
    prompts = _prompts(data.get("prompt"), vocab_size)
    sampling = _sampling(data, limits, "max_tokens", 16, {})
    logprobs = _int(data, "logprobs", None, 0, _MAX_LOGPROBS)
    sampling["logprobs"] = logprobs
    n = _int(data, "n", 1, 1, limits.max_n, " (serve.max_n)")
    assert n is not None
    if len(prompts) > _MAX_PROMPTS:
        raise RequestError(f"prompt has {len(prompts)} prompts: at most {_MAX_PROMPTS} per request", "prompt")
    rows = len(prompts) * n
    if limits.max_rows is not None and rows > limits.max_rows:
        # it could never fit, even on an idle server: a 503 would be retried for ever
        raise RequestError(
            f"this request needs {rows} rows ({len(prompts)} prompt(s) x n={n}); this server takes at most "
            f"{limits.max_rows} at once (serve.max_batch_size + serve.max_queued_requests): send fewer prompts "
            "or a smaller n",
            "n" if n > 1 else "prompt",
            "too_many_rows",
        )
    stream = _bool(data, "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", "stream_options", "invalid_type")
        if not stream:
            raise RequestError("stream_options is only allowed with stream=true", "stream_options")
        _unknown(options, {"include_usage", "continuous_usage_stats"}, "stream_options")
        include_usage = _bool(options, "include_usage")
    if data.get("user") is not None:
        _text(data["user"], "user")
    return ParsedRequest(prompts, sampling, _seed(data), n, stream, include_usage, _bool(data, "echo"), model)


def parse_generate(data: dict[str, Any], limits: Limits, defaults: dict[str, Any]) -> ParsedRequest:
    """POST /v1/generate: one prompt string; unknown fields are refused; sampling defaults from the experiment."""
    _unknown(data, _GENERATE_FIELDS, "/v1/generate")
    if "prompt" not in data:
        raise RequestError("prompt is required", "prompt", "missing_required_parameter")
    prompt = _text(data["prompt"], "prompt")
    default_tokens = min(int(defaults.get("max_new_tokens", 64)), limits.max_new_tokens)
    sampling = _sampling(data, limits, "max_new_tokens", default_tokens, defaults)
    sampling["logprobs"] = None
    return ParsedRequest([prompt], sampling, _seed(data), stream=_bool(data, "stream"))


# --------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """This replica's Prometheus counters, served at GET /metrics (scrape each replica, or run one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()  # one per replica: the default registry is process-global
        r = self.registry
        self.requests = Counter(
            "lmlab_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "lmlab_request_errors", "Requests answered with 4xx/5xx", ["status"], registry=r
        )
        self.prompt_tokens = Counter("lmlab_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("lmlab_completion_tokens", "Tokens generated", registry=r)
        self.queue = Gauge("lmlab_queue_length", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("lmlab_running_requests", "Requests decoding now", registry=r)
        self.occupancy = Gauge("lmlab_batch_occupancy", "Running rows / serve.max_batch_size", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram(
            "lmlab_time_to_first_token_seconds", "Request start to first token", buckets=buckets, registry=r
        )
        self.latency = Histogram(
            "lmlab_request_duration_seconds",
            "Request start to last byte",
            ["endpoint"],
            buckets=buckets,
            registry=r,
        )

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def finished(self, fin: Any) -> None:
        """Count one finished completion's tokens and time to first token."""
        self.prompt_tokens.inc(fin.prompt_tokens)
        self.completion_tokens.inc(fin.completion_tokens)
        if fin.time_to_first_token_s is not None:
            self.ttft.observe(fin.time_to_first_token_s)

    def render(self, stats: dict[str, float], max_batch_size: int) -> bytes:
        """Prometheus text exposition, with the engine's queue and batch gauges as of now."""
        from prometheus_client import generate_latest

        self.queue.set(stats.get("waiting", 0))
        self.running.set(stats.get("running", 0))
        self.occupancy.set(stats.get("occupancy", stats.get("running", 0) / max(1, max_batch_size)))
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------------------------
# The deployment


app = FastAPI(title="lmlab", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods in the same JSON error shape as everything else."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return RequestError(
        f"{request.method} {request.url.path}: {exc.detail}", None, code, exc.status_code
    ).response()


@dataclass(frozen=True)
class ServerSettings:
    """What each replica needs to build itself (picklable: Serve ships it to the replicas)."""

    serve: ServeConfig
    model_ref: str | None
    tracking_uri: str
    experiment: str
    api_key: str | None


class _StaticStream:
    """One request in ``batching: static``: its slot of a ``@serve.batch`` batch, pumped into a paced
    RequestStream so that it streams exactly as the engine's requests do."""

    def __init__(self, server: "LMServer", prompt_ids: list[int], params: Any) -> None:
        from lmplatform.engine import RequestStream

        self.cancelled = threading.Event()
        self._stream = RequestStream(asyncio.get_running_loop(), None, _STREAM_FLUSH_S)
        self._stream._cancelled = self.cancelled  # a disconnect cancels the batch slot
        self._pump = asyncio.create_task(
            self._run(server._static_batch((prompt_ids, params, self.cancelled)))
        )

    async def _run(self, events: AsyncIterator[Any]) -> None:
        try:
            async for event in events:
                self._stream.put([event])
                if hasattr(event, "reason"):
                    return
            raise RuntimeError("static batch ended without a Finished event")
        except Exception as exc:  # the consumer sees it as the stream's error
            self._stream.put([exc])

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._stream.__aiter__()

    def cancel(self) -> None:
        self.cancelled.set()

    async def collect(self) -> tuple[list[Any], Any]:
        return await self._stream.collect()


def _sse_line(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def _finish(reason: str) -> str:
    """Our finish reasons in OpenAI's words: eos and stop strings are both "stop"."""
    return "length" if reason == "length" else "stop"


def _choice(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def _logprobs(items: list[Any], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in items:
        out["tokens"].append(lp.token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(dict(lp.top))
        out["text_offset"].append(offset)
        offset += len(lp.token)
    return out


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several request streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if event is done:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        for s in streams:
            s.cancel()
        for t in tasks:
            t.cancel()


# --------------------------------------------------------------------------------------------------------------
# Loading the model and building the application


def load_model(
    ref: str | None, tracking_uri: str, experiment: str, device: str = "cpu", precision: str = "fp32"
) -> Any:
    """The model to serve: ``lmplatform.models.load_served_model`` (registry alias, run id or directory), at
    ``precision`` (``lm.precision.inference_model``; ``info["precision"]`` says which).

    A registry model or run is downloaded into a temporary directory that is removed as soon as the weights are
    in memory: a Serve replica never runs atexit hooks, so nothing may wait for the process to exit.
    """
    import shutil
    import tempfile

    from lm.precision import inference_model
    from lmplatform.models import default_model_ref, is_mlflow_ref, load_served_model, resolve_model

    ref = ref or default_model_ref(experiment)
    if not is_mlflow_ref(ref):
        served = load_served_model(ref, tracking_uri, experiment, device)
        info = served.info
    else:
        dest = Path(tempfile.mkdtemp(prefix="lmlab-served-"))
        try:
            found = resolve_model(ref, tracking_uri, dest)
            served = load_served_model(str(found.checkpoint), tracking_uri, experiment, device)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        info = {
            **served.info, "name": found.registered_model or served.cfg.name, "source": found.source,
            "run_id": found.run_id, "registered_model": found.registered_model, "version": found.version,
            "metrics": found.metrics, "checkpoint": None,  # downloaded, loaded, removed
        }  # fmt: skip
    model = inference_model(served.model, precision)
    return dataclasses.replace(served, model=model, info={**info, "precision": precision})


@functools.cache  # read once per process, on the first GET /
def playground_page() -> tuple[bytes, str]:
    """The playground (``GET /``): ``playground.html`` from the package and its Content-Security-Policy, which
    allows exactly the page's inline ``<script>`` and ``<style>`` (by sha256) and requests to its own origin."""
    import base64
    import hashlib
    import re
    from importlib import resources

    html = resources.files("lmplatform").joinpath("playground.html").read_text("utf-8")
    markup = re.sub(r"<!--.*?-->", "", html, flags=re.S)  # a comment may mention <script>: not an element

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", markup, re.S)
        digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in bodies)
        return " ".join(f"'sha256-{d}'" for d in digests)

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode(), csp


def engine_kind(cfg: ServeConfig, device: str) -> str:
    """Where a replica decodes (``serve.engine``): process or thread; auto is process on the CPU, thread on a GPU
    (where the child process is untested); "" while ``device`` is still auto."""
    if cfg.engine != "auto":
        return cfg.engine
    return {"cpu": "process", "cuda": "thread"}.get(device, "")


# The deployment comes after every helper it calls: serve.ingress copies the class when it is defined, with
# the module globals that exist at that moment.
@serve.deployment(name="LMServer")
@serve.ingress(app)
class LMServer:
    """One replica: the model, its decoding engine (or static batches), limits, auth and metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        import torch

        from lmplatform.engine import Engine, ProcessEngine

        cfg = settings.serve
        self.cfg = cfg
        self.api_key = settings.api_key
        torch.set_num_threads(cfg.threads or max(1, int(cfg.num_cpus)))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.served = load_model(
            settings.model_ref, settings.tracking_uri, settings.experiment, device, cfg.precision
        )
        self.tokenizer = self.served.tokenizer
        self.name = str(self.served.info.get("name") or settings.experiment)
        block = self.served.cfg.model.block_size
        self.limits = Limits(
            cfg.max_prompt_tokens or block, cfg.max_new_tokens, cfg.max_n, cfg.max_stop, cfg.max_body_bytes,
            cfg.max_request_rows(),
        )  # fmt: skip
        s = self.served.cfg.sample
        self.defaults = {
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens,
        }
        self.metrics = Metrics()
        self.engine = None
        self._static_rows = 0
        if cfg.batching == "static":
            self._static_batch.set_max_batch_size(cfg.max_batch_size)
            self._static_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        else:
            engine = engine_kind(cfg, device)
            options = dict(
                max_batch_size=cfg.max_batch_size, max_waiting=cfg.max_queued_requests, mode=cfg.batching,
                stream_interval=_STREAM_FLUSH_S,
            )  # fmt: skip
            if engine == "process":  # the child decodes with this replica's threads; this process serves HTTP
                self.engine = ProcessEngine(
                    self.served.model, self.tokenizer, threads=torch.get_num_threads(), **options
                )
            else:
                self.engine = Engine(self.served.model, self.tokenizer, **options)
        log.info(
            "replica ready: %s (%s batching, %s, %s, engine %s)", self.name, cfg.batching, device, cfg.precision,
            "none" if self.engine is None else type(self.engine).__name__,
        )  # fmt: skip

    def check_health(self) -> None:
        """Serve's health check: a replica whose decoding engine stopped is restarted."""
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError("the decoding engine is not running")

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            with contextlib.suppress(Exception):
                self.engine.close()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _stats(self) -> dict[str, float]:
        if self.engine is not None:
            return dict(self.engine.stats())
        return {"waiting": 0, "running": self._static_rows, "max_batch_size": self.cfg.max_batch_size}

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if not (ok and scheme.lower() == "bearer"):  # the scheme is case-insensitive (RFC 7235)
            raise RequestError(
                "missing or wrong API key: send the header 'Authorization: Bearer <serve.api_key>'",
                None, "invalid_api_key", 401, "authentication_error", {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = RequestError(
            f"the body is larger than {limit} bytes (serve.max_body_bytes)", None, "request_too_large", 413
        )
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    async def _answer(self, endpoint: str, request: Request, handler: Any, body: bool = True) -> Response:
        """Auth, body, handler; every refusal as a JSON error; count the outcome."""
        start = time.perf_counter()
        try:
            self._check_auth(request)
            response = await handler(await self._read_json(request), start) if body else await handler()
        except RequestError as exc:
            response = exc.response()
        except Exception as exc:  # not the client's fault: still JSON, still counted
            response = self._server_error(exc, endpoint).response()
        if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
            self.metrics.answered(endpoint, response.status_code, time.perf_counter() - start)
        return response

    def _server_error(self, exc: Exception, endpoint: str) -> RequestError:
        """A failure that is not the client's: 503 while the decoding process is gone (Serve's health check
        restarts this replica), else a bug: 500 internal_error, logged with its traceback."""
        from lmplatform.engine import EngineGone

        if isinstance(exc, EngineGone):
            return RequestError(
                f"the model is not available ({exc}); the replica is restarting, retry after "
                f"{self.cfg.retry_after_s}s", None, "engine_unavailable", 503, "server_error",
                {"Retry-After": str(self.cfg.retry_after_s)},
            )  # fmt: skip
        log.error("%s failed", endpoint, exc_info=exc)
        return RequestError(
            f"internal error: {type(exc).__name__}: {exc}", None, "internal_error", 500, "server_error"
        )

    def _encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(ids)} tokens: at most {self.limits.max_prompt_tokens} are allowed "
                "(serve.max_prompt_tokens)",
                "prompt",
                "context_length_exceeded",
            )
        return ids or [
            self.tokenizer.eos_id
        ]  # an empty prompt starts from end-of-text, as `lm generate` does

    def _open(self, prompt_ids: list[int], params: Any) -> Any:
        from lmplatform.engine import EngineFull

        if self.engine is None:
            return _StaticStream(self, prompt_ids, params)
        try:
            return self.engine.submit(prompt_ids, params)
        except EngineFull as exc:
            cfg = self.cfg
            raise RequestError(
                f"the server is busy ({exc}); retry after {cfg.retry_after_s}s", None, "server_busy",
                cfg.backpressure_status, "server_busy", {"Retry-After": str(cfg.retry_after_s)},
            ) from None  # fmt: skip

    def _streams(self, req: ParsedRequest) -> list[tuple[int, str | list[int], Any]]:
        """Open one stream per (prompt, choice): index, prompt, stream. On a refusal, cancel the ones opened."""
        from lmplatform.engine import SamplingParams

        encoded = [(p, self._encode(p)) for p in req.prompts]  # every prompt checked before any is submitted
        opened: list[tuple[int, str | list[int], Any]] = []
        try:
            for i, (prompt, ids) in enumerate(encoded):
                for j in range(req.n):
                    seed = None if req.seed is None else (req.seed + j) % (_MAX_SEED + 1)
                    params = SamplingParams(seed=seed, **req.sampling)
                    opened.append((i * req.n + j, prompt, self._open(ids, params)))
        except BaseException:
            for _, _, s in opened:
                s.cancel()
            raise
        return opened

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise RequestError(
                f"model {model!r} does not exist here: this server serves {self.name!r} (GET /v1/models)",
                "model", "model_not_found", 404,
            )  # fmt: skip

    # -- static batching -----------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # both reset from serve: in __init__
    async def _static_batch(
        self, items: list[tuple[list[int], Any, threading.Event]]
    ) -> AsyncIterator[list[Any]]:
        """Ray's static batching: one batch decoded together to its end; one list of events per step."""
        from lmplatform.engine import decode_static

        steps = decode_static(
            self.served.model, self.tokenizer, [(ids, p) for ids, p, _ in items], [c for _, _, c in items]
        )
        self._static_rows += len(items)
        try:
            while True:
                step = await asyncio.to_thread(next, steps, None)  # torch off the event loop
                if step is None:
                    return
                yield [StopIteration if event is None else event for event in step]
        finally:
            self._static_rows -= len(items)

    # -- endpoints -----------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> Response:
        """Whether this replica can serve (503 while its decoding process is gone), open even with auth on."""
        if self.engine is not None and not self.engine.alive:
            return JSONResponse({"status": "unavailable", "model": self.name}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.name})

    @app.get("/")
    async def playground(self) -> Response:
        """The playground page; open even with auth on: it holds no secret and asks for the key itself."""
        start = time.perf_counter()
        html, csp = playground_page()
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        }
        self.metrics.answered("playground", 200, time.perf_counter() - start)
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text format: requests, errors by status, tokens, queue, batch occupancy, TTFT."""

        async def render() -> Response:
            body = self.metrics.render(self._stats(), self.cfg.max_batch_size)
            return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

        return await self._answer("metrics", request, render, body=False)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """OpenAI's model list: the one model this server serves."""

        async def listing() -> Response:
            created = int(self.served.info.get("created", time.time()))
            item = {"id": self.name, "object": "model", "created": created, "owned_by": "lmlab"}
            return JSONResponse({"object": "list", "data": [item]})

        return await self._answer("models", request, listing, body=False)

    @app.get("/v1/model")
    async def model(self, request: Request) -> Response:
        """The served model: source, run id, registry version, metrics, config; the batching settings and stats."""
        from lm.config import to_dict

        async def describe() -> Response:
            info = {k: v for k, v in self.served.info.items() if k != "created"}
            c = self.cfg
            serving = {
                "batching": c.batching, "max_batch_size": c.max_batch_size, "replicas": c.replicas,
                "limits": dataclasses.asdict(self.limits), "engine": self._stats(),
            }  # fmt: skip
            body = {**info, "id": self.name, "config": to_dict(self.served.cfg), "serving": serving}
            return JSONResponse(json.loads(json.dumps(body, default=str)))

        return await self._answer("model", request, describe, body=False)

    @app.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        """Native shape: prompt, sampling settings -> text, tokens, finish_reason, usage, timing (or SSE)."""
        return await self._answer("generate", request, self._generate)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI completions: what the official ``openai`` client's ``completions.create`` sends."""
        return await self._answer("completions", request, self._completions)

    # -- /v1/generate --------------------------------------------------------------------------------------

    async def _generate(self, data: dict[str, Any], start: float) -> Response:
        req = parse_generate(data, self.limits, self.defaults)
        ((_, _, stream),) = self._streams(req)
        if req.stream:
            return await self._sse("generate", start, self._generate_events(stream), [stream])
        try:
            deltas, fin = await stream.collect()
        finally:
            stream.cancel()  # a no-op when it finished; frees the row when this request was cancelled
        self.metrics.finished(fin)
        tokens = [t for d in deltas for t in d.token_ids]
        return JSONResponse({"model": self.name, "text": fin.text, "tokens": tokens, **self._summary(fin)})

    @staticmethod
    def _summary(fin: Any) -> dict[str, Any]:
        total = fin.prompt_tokens + fin.completion_tokens
        return {
            "finish_reason": fin.reason,
            "usage": {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens, "total_tokens": total},
            "timing": {
                "time_to_first_token_s": fin.time_to_first_token_s, "total_s": fin.total_s,
                "tokens_per_s": fin.completion_tokens / fin.total_s if fin.total_s else None,
            },
        }  # fmt: skip

    async def _generate_events(self, stream: Any) -> AsyncIterator[dict[str, Any]]:
        async for event in stream:
            if hasattr(event, "reason"):
                self.metrics.finished(event)
                yield self._summary(event)
                return
            yield {"text": event.text, "tokens": list(event.token_ids)}

    # -- /v1/completions -----------------------------------------------------------------------------------

    async def _completions(self, data: dict[str, Any], start: float) -> Response:
        req = parse_completion(data, self.limits, self.served.cfg.model.vocab_size)
        self._check_model(req.model)
        opened = self._streams(req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            events = self._completion_chunks(req, opened, rid, created)
            return await self._sse("completions", start, events, [s for _, _, s in opened])
        try:
            results = await asyncio.gather(*(s.collect() for _, _, s in opened))
        finally:
            for _, _, s in opened:
                s.cancel()
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for (index, prompt, _), (deltas, fin) in zip(opened, results):
            self.metrics.finished(fin)
            completion_tokens += fin.completion_tokens
            if index % req.n == 0:
                prompt_tokens += fin.prompt_tokens
            echo = self._echo_text(prompt) if req.echo else ""
            logprobs = (
                _logprobs([lp for d in deltas for lp in d.logprobs or []], len(echo))
                if req.sampling["logprobs"] is not None
                else None
            )
            choices.append(
                {
                    "text": echo + fin.text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": _finish(fin.reason),
                }
            )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.name,
                "choices": choices,
                "usage": usage,
            }
        )

    def _echo_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    async def _completion_chunks(
        self, req: ParsedRequest, opened: list[tuple[int, str | list[int], Any]], rid: str, created: int
    ) -> AsyncIterator[dict[str, Any]]:
        """OpenAI stream chunks: text per choice as it comes, a finish_reason chunk per choice, then usage."""
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        usage_field = {"usage": None} if req.include_usage else {}
        want_logprobs = req.sampling["logprobs"] is not None
        offsets = {index: 0 for index, _, _ in opened}
        if req.echo:
            for index, prompt, _ in opened:
                text = self._echo_text(prompt)
                offsets[index] = len(text)
                yield {**head, "choices": [_choice(index, text, None, None)], **usage_field}
        prompt_tokens = completion_tokens = 0
        async for i, event in _merge([s for _, _, s in opened]):
            index, _, _ = opened[i]
            if hasattr(event, "reason"):
                self.metrics.finished(event)
                completion_tokens += event.completion_tokens
                prompt_tokens += event.prompt_tokens if index % req.n == 0 else 0
                yield {**head, "choices": [_choice(index, "", None, _finish(event.reason))], **usage_field}
                continue
            lp = _logprobs(event.logprobs or [], offsets[index]) if want_logprobs else None
            offsets[index] += len(event.text)
            yield {**head, "choices": [_choice(index, event.text, lp, None)], **usage_field}
        if req.include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            yield {**head, "choices": [], "usage": usage}

    # -- server-sent events --------------------------------------------------------------------------------

    async def _sse(
        self, endpoint: str, start: float, events: AsyncIterator[dict[str, Any]], streams: list[Any]
    ) -> Response:
        """A text/event-stream whose status is decided by its first event: an error before it is a JSON error,
        one after it an ``error`` event (never a silently truncated 200); ``data: [DONE]`` ends it."""
        try:
            first = await events.__anext__()
        except BaseException:
            for s in streams:
                s.cancel()
            raise

        async def body() -> AsyncIterator[bytes]:
            status, pending, flushed = 200, [], time.monotonic()
            try:
                yield _sse_line(first)
                async for event in events:
                    pending.append(_sse_line(event))
                    # The streams are paced, so text comes at most once per interval and goes out at once;
                    # what follows within half of it (the finish and usage chunks) goes with the next write.
                    if time.monotonic() - flushed >= _STREAM_FLUSH_S / 2:
                        yield b"".join(pending)
                        pending, flushed = [], time.monotonic()
            except Exception as exc:  # after the first byte the status is sent: tell the client in-band
                error = self._server_error(exc, f"{endpoint} stream")
                status = error.status
                pending.append(_sse_line(error.body()))
            finally:
                for s in streams:
                    s.cancel()  # a disconnected client's rows are freed here (CancelledError at an await)
                with contextlib.suppress(Exception):
                    await events.aclose()
                self.metrics.answered(endpoint, status, time.perf_counter() - start)
            yield b"".join(pending) + b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type=_SSE, headers={"Cache-Control": "no-cache"})


def build_app(settings: ServerSettings) -> serve.Application:
    """The Serve application: replicas, CPUs/GPUs, request caps and backpressure from ``serve:``."""
    cfg = settings.serve
    # Engine modes queue inside the replica (EngineFull -> our JSON 503/429): let a burst reach it, keeping Serve's
    # own queue (same status, plain-text body) as a backstop. Static mode queues in Serve: at most one batch in
    # flight per replica, the rest in Serve's bounded queue.
    if cfg.batching == "static":
        ongoing, queued = cfg.max_batch_size, cfg.max_queued_requests
    else:
        ongoing = cfg.max_batch_size + cfg.max_queued_requests
        queued = ongoing * cfg.replicas
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.device == "cuda":
        actor["num_gpus"] = 1
    deployment = LMServer.options(
        num_replicas=cfg.replicas,
        ray_actor_options=actor,
        max_ongoing_requests=ongoing + 4,  # + room for /healthz and /metrics
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,  # a dead decoding process: restarted in 3 periods
        max_queued_requests=queued,
        backpressure_config={"status_code": cfg.backpressure_status, "retry_after_s": cfg.retry_after_s},
    )
    return deployment.bind(settings)


APP_BUILDER_ARGS = ("config", "overrides", "model")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``import_path: lmplatform.serve:app_builder`` (a KubeRay RayService, ``serve run``
    with a config file): ``args`` may name ``config`` (an experiment YAML with a ``serve:`` section),
    ``overrides`` (dotted, e.g. ``serve.replicas=2``) and ``model``; the MLflow store is $MLFLOW_TRACKING_URI.
    HTTP host and port belong to the Serve config's ``http_options``, not to ``serve.host``/``serve.port``."""
    from lm.config import ConfigError
    from lmplatform.config import load_platform_config

    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_BUILDER_ARGS))
    if unknown:
        raise ConfigError(f"app_builder args {unknown} are not allowed: use {', '.join(APP_BUILDER_ARGS)}")
    overrides = args.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(
            f"app_builder args.overrides={overrides!r} is not allowed: a list of KEY=VALUE strings"
        )
    _, pcfg = load_platform_config(args.get("config"), overrides)
    scfg = (
        pcfg.serve if args.get("model") is None else dataclasses.replace(pcfg.serve, model=str(args["model"]))
    )
    tr = pcfg.tracking
    settings = ServerSettings(
        scfg, model_ref(scfg.model), tr.uri or "", tr.experiment or "", resolve_api_key(scfg)
    )
    return build_app(settings)


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """``serve.api_key``, else ``$LMLAB_API_KEY``, else None (no auth)."""
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 8:
        from lm.config import ConfigError

        raise ConfigError(f"{API_KEY_ENV} is too short: use 8 characters or more")
    return key


def model_ref(ref: str | None) -> str | None:
    """A directory made absolute (replicas run in other directories); registry URIs and run ids as given."""
    if ref is not None and not ref.startswith("models:/") and Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    return ref


# --------------------------------------------------------------------------------------------------------------
# `lm serve`: the foreground server, its pid file and `--stop`


def serve_command(args: Any) -> int:
    """``lm serve [CONFIG] [overrides] [--model] [--host] [--port] [--stop]``."""
    from lmplatform.config import load_platform_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # `lm serve serve.port=9000`
        config, overrides = None, [config, *overrides]
    _, pcfg = load_platform_config(config, overrides)
    flags = {"model": args.model, "host": args.host, "port": args.port}
    scfg = dataclasses.replace(
        pcfg.serve, **{k: v for k, v in flags.items() if v is not None}
    )  # validated again
    scfg = dataclasses.replace(scfg, pid_file=str(Path(scfg.pid_file).expanduser().resolve()))
    if args.stop:
        print(stop_server(scfg.pid_file))
        return 0
    tr = pcfg.tracking
    settings = ServerSettings(
        scfg, model_ref(scfg.model), tr.uri or "", tr.experiment or "", resolve_api_key(scfg)
    )
    return serve_foreground(settings, pcfg.ray.address)


def generate_command(args: Any) -> int:
    """``lm generate --url URL``: stream samples from a running server (auth from $LMLAB_API_KEY)."""
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        stream_from_server(
            args.url, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            args.seed + i, os.environ.get(API_KEY_ENV),
        )  # fmt: skip
    return 0


def check_port_free(host: str, port: int) -> None:
    """Fail at once with the fix when ``host:port`` is taken (Serve's proxy would only log it and retry)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"serve.port={port} on {host} is not available ({exc.strerror}): pass --port, or stop the server "
                "there (`lm serve --stop`)"
            ) from None


def serve_foreground(settings: ServerSettings, ray_address: str | None, print_fn: Any = print) -> int:
    """Start Ray and Serve, deploy, print how to call it, and block until SIGINT/SIGTERM; then shut it all down.

    Without ``ray.address`` / RAY_ADDRESS this starts its own local Ray and stops it on exit; on a cluster it
    joins, it deletes only its own application. One SIGINT/SIGTERM also aborts a startup under way.
    """
    import ray
    from ray.serve.api import RunTarget

    cfg = settings.serve
    where = ray_address or os.environ.get("RAY_ADDRESS")
    own_cluster = not where or where == "local"
    direct = use_direct_ingress(cfg, own_cluster)
    pid_file = Path(cfg.pid_file)
    check_pid_file(pid_file)
    if own_cluster:
        check_port_free(cfg.host, cfg.port)
    if settings.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve.host=%s accepts connections from other machines and no API key is set", cfg.host)
    stop = _Stop()
    restore_signals = _on_signals(stop)  # before anything slow: a signal during startup aborts it
    serve_up = deployed = False
    bye = "shutting Serve and Ray down"
    if not own_cluster:
        bye = f"deleting application {cfg.app_name} from the Ray cluster at {where} (Serve and Ray keep running)"
    try:
        _write_pid_file(pid_file)  # `lm serve --stop` reaches a startup too
        served = load_model(
            settings.model_ref, settings.tracking_uri, settings.experiment, "cpu"
        )  # fail fast
        name = served.info.get("name") or settings.experiment
        if not stop.event.is_set():
            if own_cluster:  # the replica and the proxy at the server's priority, not Ray's nice 15
                normal_worker_priority()
            if direct:  # read by Serve's controller and replica processes, which this ray.init starts
                os.environ.update(direct_ingress_env(cfg.port))
            try:
                ray.init(
                    address=where or "local",
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    logging_config=ray.LoggingConfig(log_level="ERROR"),
                )
            except ConnectionError as exc:
                raise ServeError(
                    f"cannot join the Ray cluster at {where or 'local'} (ray.address / RAY_ADDRESS): {_short(str(exc))}"
                ) from None
            _on_signals(stop)  # again: ray.init installs its own SIGTERM handler
        if not stop.event.is_set():
            check_resources(cfg, ray.cluster_resources())
            host, port = _start_serve(cfg, own_cluster, where, print_fn, direct)
            serve_up = True
            print_fn(
                f"lm serve: starting {cfg.replicas} replica(s) of {name} (serve.startup_timeout_s="
                f"{cfg.startup_timeout_s:g}; Ctrl-C aborts)",
                flush=True,
            )
            target = RunTarget(build_app(settings), name=cfg.app_name, route_prefix=cfg.route_prefix)
            serve.run_many(
                [target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
            )
            deployed = True
            _wait_running(cfg, stop)
        if stop.event.is_set():
            print_fn(f"lm serve: {stop.reason} during startup: {bye}", flush=True)
            return stop.exit_code
        url = f"http://{_url_host(host)}:{port}{cfg.route_prefix.rstrip('/')}"
        _write_pid_file(pid_file, url)
        print_fn(f"serving {name} ({served.info.get('source') or settings.model_ref}) at {url}", flush=True)
        batch = "one request at a time" if cfg.batching == "none" else f"max batch {cfg.max_batch_size}"
        auth, key_from = "", ""
        if settings.api_key is not None:  # never print the key itself
            key_from = "serve.api_key in the config" if cfg.api_key else f"${API_KEY_ENV}"
            auth = f' -H "Authorization: Bearer {"<serve.api_key>" if cfg.api_key else "$" + API_KEY_ENV}"'
        auth_on = f", bearer auth on (key: {key_from})" if key_from else ""
        ingress = "direct ingress (the replica serves HTTP)" if direct else "Serve's HTTP proxy"
        engine = {"process": ", decoding in a child process", "thread": ", decoding in a thread"}.get(
            engine_kind(cfg, cfg.device) if cfg.batching != "static" else "", ""
        )  # unknown until a replica resolves serve.device=auto
        print_fn(
            f"  {cfg.batching} batching ({batch}), {cfg.replicas} replica(s), {ingress}{engine}{auth_on}; Ctrl-C or "
            "`lm serve --stop` stops it",
            flush=True,
        )
        print_fn(f"  playground: open {url}/ in a browser", flush=True)
        print_fn(
            f"  curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"""-d '{{"model": "{name}", "prompt": "ROMEO:", "max_tokens": 32}}'""",
            flush=True,
        )
        while not stop.event.wait(0.5):
            pass
        print_fn(f"lm serve: {stop.reason}: {bye}", flush=True)
        return 0
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                if own_cluster and serve_up:  # (serve.shutdown logs a note when there is nothing to stop)
                    serve.shutdown()
                elif deployed:
                    serve.delete(cfg.app_name)
            ray.shutdown()
        _remove_pid_file(pid_file)
        restore_signals()


def check_resources(cfg: ServeConfig, resources: dict[str, float]) -> None:
    """Refuse at once replicas the Ray cluster can never place (Serve would wait for them for ever)."""
    cpus, need = float(resources.get("CPU", 0.0)), cfg.replicas * cfg.num_cpus
    if need > cpus + 1e-9:
        each = math.floor(cpus / cfg.replicas * 100) / 100
        raise ServeError(
            f"serve.replicas={cfg.replicas} x serve.num_cpus={cfg.num_cpus:g} needs {need:g} CPUs but the Ray "
            f"cluster has {cpus:g}: lower serve.replicas or serve.num_cpus (e.g. serve.num_cpus={each:g})"
        )
    gpus = float(resources.get("GPU", 0.0))
    if cfg.device == "cuda" and cfg.replicas > gpus:
        raise ServeError(
            f"serve.device=cuda needs one GPU per replica (serve.replicas={cfg.replicas}) but the Ray cluster "
            f"has {gpus:g} GPUs: use serve.device=cpu (or auto), or fewer replicas"
        )


def use_direct_ingress(cfg: ServeConfig, own_cluster: bool) -> bool:
    """Whether the replica serves HTTP itself (``serve.ingress``); direct needs a Ray this command starts, since
    Serve reads the switch from the environment of the processes the cluster starts."""
    if cfg.ingress == "direct" and not own_cluster:
        raise ServeError(
            "serve.ingress=direct needs lm serve's own Ray (Serve's direct ingress is switched on in the "
            "environment of the cluster's processes): drop ray.address/RAY_ADDRESS, or use serve.ingress=proxy"
        )
    return cfg.ingress == "direct" or (cfg.ingress == "auto" and own_cluster and cfg.replicas == 1)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve 2.60's direct ingress (experimental): the ingress replica runs its own HTTP server on a port
    from the range [MIN, MAX), here only ``port``. No load balancer sits in front to deregister a replica from,
    so a replica drains for 0 s on shutdown instead of 30, and a restarted one takes the port back at once
    instead of after a quarantine meant for HAProxy."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _start_serve(
    cfg: ServeConfig, own_cluster: bool, where: str | None, print_fn: Any, direct: bool = False
) -> tuple[str, int]:
    """Start Serve on serve.host:port; on a cluster where it already runs, refuse a taken app name or route
    prefix and return where its proxy really listens (Serve's HTTP options are fixed when it first starts).
    With direct ingress the replica takes serve.port and Serve's proxy, which Serve still starts, another."""
    from ray.serve.context import _get_global_client

    client = None if own_cluster else _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        if not own_cluster:
            check_port_free(cfg.host, cfg.port)
        serve.start(http_options={"host": cfg.host, "port": free_port(cfg.host) if direct else cfg.port})
        return cfg.host, cfg.port
    apps = client.get_serve_details().get("applications") or {}
    if cfg.app_name in apps:
        raise ServeError(
            f"serve.app_name={cfg.app_name} is already running on the Ray cluster at {where} (another lm serve?): "
            "pick another name with serve.app_name=NAME, or stop that one first"
        )
    for other, details in apps.items():
        if (details or {}).get("route_prefix") == cfg.route_prefix:
            raise ServeError(
                f"serve.route_prefix={cfg.route_prefix} is taken by application {other} on the Ray cluster at "
                f"{where}: pick another with serve.route_prefix=/NAME"
            )
    http = client.http_config
    if (http.host, http.port) != (cfg.host, cfg.port):
        print_fn(
            f"lm serve: Serve already runs on this cluster at {http.host}:{http.port} (its HTTP options are "
            f"fixed when it first starts): serving there, not at {cfg.host}:{cfg.port}",
            flush=True,
        )
    return http.host, http.port


def _wait_running(cfg: ServeConfig, stop: "_Stop") -> None:
    """Wait until the application runs; ServeError when it failed or serve.startup_timeout_s passed first."""
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + cfg.startup_timeout_s
    while not stop.event.wait(0.5):
        app = serve.status().applications.get(cfg.app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        why = "" if app is None else _short(app.message or _deployment_messages(app))
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise ServeError(f"serve.app_name={cfg.app_name} failed to start: {why}")
        if time.monotonic() > deadline:
            raise ServeError(
                f"the replicas were not running {cfg.startup_timeout_s:g}s after the start "
                f"(serve.startup_timeout_s): {_short(_deployment_messages(app)) if app else 'not deployed'}"
            )


def _deployment_messages(app: Any) -> str:
    return "; ".join(d.message for d in app.deployments.values() if d.message) or f"status {app.status}"


def _short(message: str, limit: int = 600) -> str:
    """A Serve status message on one line: its first line and, for a traceback, the exception at its end."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class _Stop:
    """Set by SIGINT/SIGTERM; remembers which."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = "stopped"
        self.signum = 0

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a shell reports a process it ended."""
        return 128 + self.signum if self.signum else 1


def _on_signals(stop: _Stop) -> Any:
    """SIGINT/SIGTERM set ``stop``; a second one only says a shutdown is under way (stopping Ray halfway would
    orphan its agents); a third acts as it would without us. Returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        if not stop.event.is_set():
            stop.reason, stop.signum = signal.Signals(signum).name, signum
            stop.event.set()
            return
        print(
            f"lm serve: {signal.Signals(signum).name} again: already shutting down (once more forces it)",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, old in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(s, old if old is not None else signal.SIG_DFL)

    return restore


def check_pid_file(path: Path) -> None:
    """Refuse to start when ``path`` names a live ``lm serve`` (its ``--stop`` could not reach it any more);
    remove it when stale."""
    try:
        fields = path.read_text().split()
    except OSError:
        return
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    if pid is not None and pid != os.getpid() and _is_lm_serve(pid):
        at = f" at {fields[1]}" if len(fields) > 1 else " (starting)"
        raise ServeError(
            f"serve.pid_file={path} names a running lm serve (pid {pid}{at}): stop it first (`lm serve --stop` "
            f"with the same serve.pid_file, or kill -INT {pid}), or give this server its own serve.pid_file=PATH"
        )
    path.unlink(missing_ok=True)


def _write_pid_file(path: Path, url: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n" + (f"{url}\n" if url else ""))


def _remove_pid_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.read_text().split()[:1] == [str(os.getpid())]:
            path.unlink()


def stop_server(pid_file: str | Path, timeout: float = 60.0) -> str:
    """Send SIGTERM to the ``lm serve`` recorded in ``pid_file`` and wait for it to exit; a message."""
    path = Path(pid_file)
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise ServeError(
            f"no server to stop: {path} does not exist or holds no pid (was it started with lm serve?)"
        ) from None
    if not _is_lm_serve(pid):
        path.unlink(missing_ok=True)
        raise ServeError(
            f"no server to stop: process {pid} from {path} is not running lm serve (stale file removed)"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_lm_serve(pid):
            return f"stopped lm serve (pid {pid})"
        time.sleep(0.2)
    raise ServeError(
        f"lm serve (pid {pid}) did not exit within {timeout:.0f}s of SIGTERM; kill -INT {pid} again"
    )


def _is_lm_serve(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    if "\nState:\tZ" in status:
        return False
    return b"serve" in cmdline


# --------------------------------------------------------------------------------------------------------------
# `lm generate --url`: a streaming client for a running server


def stream_from_server(
    url: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
    seed: int | None, api_key: str | None = None, out: Any = None, timeout: float = 300.0,
) -> dict[str, Any]:  # fmt: skip
    """POST /v1/generate with ``stream: true``, write the text as it arrives; returns the final event."""
    import urllib.error
    import urllib.request

    out = out or sys.stdout
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature, "stream": True}
    body.update({k: v for k, v in {"top_k": top_k, "top_p": top_p, "seed": seed}.items() if v is not None})
    headers = {"Content-Type": "application/json", "Accept": _SSE}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    base = url.rstrip("/")
    base = base.removesuffix("/v1")  # the openai client's base URL form names the same server
    request = urllib.request.Request(base + "/v1/generate", json.dumps(body).encode(), headers, method="POST")
    final: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            out.write(prompt)
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise ServeError(f"{url}: the server failed mid-stream: {event['error'].get('message')}")
                if "finish_reason" in event:
                    final = event
                else:
                    out.write(event["text"])
                    out.flush()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ServeError(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServeError(f"cannot reach {url} ({reason}): is `lm serve` running there?") from None
    out.write("\n")
    return final


def iter_sse(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, up to ``data: [DONE]`` (for tests and clients)."""
    for raw in lines:
        line = raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw.strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: ") :])
