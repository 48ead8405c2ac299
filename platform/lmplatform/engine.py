"""Continuous (iteration-level) batching for serving: one scheduler owns a batched KV cache, in a thread of this
process (``Engine``) or in a child process (``ProcessEngine``).

At every decode step the scheduler admits waiting requests into free rows (prefill), advances every live
row by one token in one forward (rows at different positions, ``lm.generate.BatchDecoder``), and retires rows
that hit EOS, a stop string, their length or a cancel, so a short request never waits for a long one. Text
streams as ``Delta`` events (UTF-8 safe, stop strings held back until they cannot match) and ends with one
``Finished``. No Ray and no HTTP here: ``lmplatform.serve`` wraps it. Requests admitted in one step share one
padded prefill. Past block_size a row keeps going: when its cache is full, its last block_size/2 - 1 tokens are
re-prefilled at positions 0.. (``BatchDecoder``), about one extra token of work per generated token.

Sampling: every request draws from its own ``torch.Generator`` (CPU, seeded by ``SamplingParams.seed``; one
uniform draw per sampled token), through ``lm.generate.filter_logits`` with its own temperature/top-k/top-p, so
a request's draws never depend on its batch. By default logits differ between batch shapes only by float
rounding (~1e-7): greedy tokens are the same alone or batched unless two logits tie within it, and a seeded
sampled request gives the same tokens unless a draw falls within it of a token boundary (~1e-6 per token).
``Engine(exact=True)`` keeps every shape independent of the batch: logits and seeded samples bit-identical.
Logprobs are those of the model's own distribution (log-softmax of the temperature-1 logits, before top-k/top-p),
as OpenAI reports them. ``completion_tokens`` counts every sampled token, EOS and stop-string tokens included;
``Delta.token_ids`` hold only the tokens whose text is in the completion.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import functools
import itertools
import logging
import math
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from lm.generate import BatchDecoder, filter_logits, sample_next
from lm.model import TransformerLM
from lm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODES = ("continuous", "none")
MAX_LOGPROBS = 5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; invalid values raise ValueError naming the field."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float | None = None  # None or 1.0 = off
    seed: int | None = None  # None: a random seed chosen per request
    stop: tuple[str, ...] = ()  # never leaks into the text, also when split across tokens
    logprobs: int | None = None  # None = off; 0..5 = the chosen token's logprob plus that many alternatives

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from JSON is fine too
        t, k, p, lp = self.temperature, self.top_k, self.top_p, self.logprobs
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
            "max_new_tokens",
            self.max_new_tokens,
            "an integer >= 0",
        )
        _check(
            _is_number(t) and math.isfinite(t) and t >= 0,
            "temperature",
            t,
            "a finite number >= 0 (0 = greedy)",
        )
        _check(k is None or (_is_int(k) and k >= 0), "top_k", k, "None or an integer >= 0 (0 = off)")
        _check(p is None or (_is_number(p) and 0.0 < p <= 1.0), "top_p", p, "None or a number in (0, 1]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(
            lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS),
            "logprobs",
            lp,
            f"None or 0..{MAX_LOGPROBS}",
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's text and logprob, with up to 5 most likely alternatives (text -> logprob)."""

    token: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class Delta:
    """New text since the last event (never half a character), the tokens behind it and their logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended, the whole completion (without the stop string), usage."""

    reason: str  # "eos" | "length" | "stop" | "cancelled"
    text: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    total_s: float


class EngineFull(RuntimeError):
    """Too many requests are waiting for a row: the server should answer 503 or 429."""


class EngineError(RuntimeError):
    """Decoding failed inside the engine (raised by the stream of every request it was decoding)."""


class EngineGone(EngineError):
    """The decoding process is gone: its requests fail, and so does every later submit, until a restart."""


Event = Delta | Finished


class RequestStream:
    """The events of one request: ``async for event in stream`` yields Delta ... Finished.

    ``interval`` (seconds, 0 = off: one Delta per decode step) paces the stream: after a Delta, the next one waits
    until ``interval`` has passed (the end of the request does not wait), and every Delta that arrived meanwhile
    comes as one. The first Delta is never delayed. A consumer that streams to a client then handles a few
    events per second per request instead of one per decode step.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,
        on_cancel: Callable[[], None] | None,
        interval: float = 0.0,
    ) -> None:
        self._loop = loop
        self._on_cancel = on_cancel  # tells the scheduler (a thread's condition, or the decoding process)
        self._interval = interval
        self._items: collections.deque[Event | BaseException] = collections.deque()
        self._ready = asyncio.Event() if loop else None  # set while _items holds something
        self._ended = asyncio.Event() if loop else None  # set once Finished or an error is in _items
        self._cancelled = threading.Event()
        self._iterator: AsyncIterator[Event] | None = None
        self.finished: Finished | None = None
        self.admitted_step: int | None = None  # the engine's step counter when the request got a row
        self.finished_step: int | None = None  # ... and when it left it

    def cancel(self) -> None:
        """Stop decoding this request: its row is freed within one decode step and it ends "cancelled"."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` was called."""
        return self._cancelled.is_set()

    def __aiter__(self) -> AsyncIterator[Event]:
        # One iterator per stream: reading the first event, then ``async for`` (or collect) continues it.
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def _events(self) -> AsyncIterator[Event]:
        assert self._ready is not None and self._ended is not None
        done = False
        last_delta: float | None = None  # loop time of the last Delta handed out
        try:
            while True:
                if last_delta is not None and not self._ended.is_set():
                    wait = last_delta + self._interval - self._loop.time()  # type: ignore[union-attr]
                    if wait > 0:  # let Deltas gather, unless the request ends meanwhile
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._ended.wait(), wait)
                await self._ready.wait()
                event = self._take()
                if isinstance(event, BaseException):
                    done = True
                    raise event
                if isinstance(event, Finished):
                    done = True
                elif self._interval > 0:
                    last_delta = self._loop.time()  # type: ignore[union-attr]
                yield event
                if done:
                    return
        finally:
            if not done:  # the consumer went away (disconnect): give the row back
                self.cancel()

    def _take(self) -> Event | BaseException:
        """The first item; when paced, a Delta merged with the Deltas right behind it (one text, in order)."""
        items = self._items
        event = items.popleft()
        if self._interval > 0 and isinstance(event, Delta) and items and isinstance(items[0], Delta):
            merged = [event]
            while items and isinstance(items[0], Delta):
                merged.append(items.popleft())  # type: ignore[arg-type]
            event = _join(merged)
        if not items:
            self._ready.clear()  # type: ignore[union-attr]
        return event

    async def collect(self) -> tuple[list[Delta], Finished]:
        """The Delta events not read yet, and the Finished event."""
        deltas: list[Delta] = []
        async for event in self:
            if isinstance(event, Finished):
                return deltas, event
            deltas.append(event)
        raise EngineError("the stream ended without a Finished event")

    def put(self, events: Sequence[Event | BaseException]) -> None:
        """Append events; call on the stream's event loop (``_deliver`` from any other thread)."""
        if not events or self._ready is None or self._ended is None:
            return
        self._items.extend(events)
        self._ready.set()
        if isinstance(events[-1], (Finished, BaseException)):
            self._ended.set()


def _join(deltas: list[Delta]) -> Delta:
    """Consecutive Deltas of one request as one."""
    logprobs = None if deltas[0].logprobs is None else [lp for d in deltas for lp in d.logprobs or []]
    return Delta("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], logprobs)


def _deliver(results: Sequence[tuple[RequestStream, Sequence[Event | BaseException]]]) -> None:
    """Hand a step's events to their streams: one wake-up per event loop, not one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Sequence[Event | BaseException]]]] = {}
    for stream, events in results:
        if stream._loop is not None and events:
            by_loop.setdefault(stream._loop, []).append((stream, events))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            for stream, _ in batch:
                stream.cancel()  # frees the row, also in a decoding process


def _put_all(batch: list[tuple[RequestStream, Sequence[Event | BaseException]]]) -> None:
    for stream, events in batch:
        stream.put(events)


class Engine:
    """Continuous batching over one model: ``submit`` from an event loop, decoding in a scheduler thread.

    ``mode="continuous"`` admits waiting requests into free rows at every decode step; ``mode="none"`` decodes
    one request at a time (FIFO), the baseline. ``exact=True`` runs every decode step at the full batch shape
    (``BatchDecoder(fixed_shape=True)``), so a request's logits, and so its seeded samples, are bit-identical
    whatever else is running, for full-batch work at every step. ``stream_interval`` paces every request's
    stream (see RequestStream). The model is put in eval mode; torch's thread count is the caller's to set.
    """

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 32,
        max_waiting: int = 256,
        mode: str = "continuous",
        exact: bool = False,
        stream_interval: float = 0.0,
    ) -> None:
        _check_setup(mode, max_batch_size, max_waiting, stream_interval)
        self.mode = mode
        self.stream_interval = float(stream_interval)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self._core = _Core(model, tokenizer, max_batch_size if mode == "continuous" else 1, exact)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._busy = 0  # rows in use or being filled, as of the scheduler's last look (under _wake)
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """Queue a request; call inside a running event loop. Raises EngineFull when max_waiting requests
        already wait beyond the free rows (0: accept only what a free row can take), ValueError for token ids
        outside the vocabulary."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(loop, self._notify, self.stream_interval)
        request = self._core.request(prompt_ids, params, stream)
        with self._wake:
            if self._closed:
                raise EngineError("the engine is closed")
            # Free rows take waiting requests at the next step: only what waits beyond them counts.
            if len(self._waiting) >= self.max_waiting + self._core.decoder.max_rows - self._busy:
                raise EngineFull(
                    f"{len(self._waiting)} requests are waiting for a row already "
                    f"(max_waiting={self.max_waiting}, all {self._core.decoder.max_rows} rows busy)"
                )
            self._waiting.append(request)
            self._wake.notify_all()
        return stream

    @property
    def alive(self) -> bool:
        """Whether the scheduler runs (False once closed)."""
        return self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: queue, batch occupancy, steps, tokens."""
        return _stats(self._core, len(self._waiting), self._busy)

    def close(self) -> None:
        """Stop the scheduler; every waiting or running request ends "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=60)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _deliver(self, results: list[tuple[_Request, list[Event]]]) -> None:
        self._busy = len(self._core.rows)  # before the events: whoever reads a Finished sees its row free
        _deliver([(request.stream, events) for request, events in results])

    def _run(self) -> None:
        core = self._core
        while True:
            with self._wake:
                while True:
                    admit, gone = _admissions(core, self._waiting)
                    self._deliver(gone)
                    self._busy = len(core.rows) + len(admit)  # what submit and stats see during the step
                    if self._closed or admit or core.rows:
                        break
                    self._wake.wait()
                if self._closed:
                    self._waiting.extendleft(reversed(admit))  # ended below with the rest
                    break
            _step(core, admit, self._deliver)
        with self._wake:
            leftover = list(self._waiting)
            self._waiting.clear()
        self._deliver(_cancel_all(core, leftover))


class ProcessEngine:
    """``Engine`` with its scheduler in a child process: the same submit, streams, batching and results.

    Why: a replica that serves HTTP and decodes in one process shares one GIL between them. Under load its
    event loops wait for the decoding thread's Python (sampling, text, events), and a new request's way in
    and its first token wait with them. Here a child process owns the model and the batched KV cache and
    runs the same scheduling loop as ``Engine``; this process keeps only the streams. Pickled messages go
    over a socket pair: submit and cancel one way, each step's events with the engine's counters the other,
    read by one thread that hands them to the streams' event loops.

    The model and tokenizer are pickled to the child once (a copy: the caller's stays usable); the child
    sets ``threads`` torch threads. The child ends after ``close`` and also when this process dies (it reads
    end-of-file). If the child dies, every open request ends with EngineError, so does every later
    ``submit``, and ``alive`` turns False (Serve's health check restarts the replica).
    """

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 32,
        max_waiting: int = 256,
        mode: str = "continuous",
        exact: bool = False,
        stream_interval: float = 0.0,
        threads: int = 1,
        start_timeout_s: float = 300.0,
    ) -> None:
        _check_setup(mode, max_batch_size, max_waiting, stream_interval)
        if not (_is_int(threads) and threads >= 1):
            raise ValueError(f"threads={threads!r} is not allowed: must be an integer >= 1")
        self.mode = mode
        self.stream_interval = float(stream_interval)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self._rows = max_batch_size if mode == "continuous" else 1
        self._vocab = model.cfg.vocab_size
        self._streams: dict[int, RequestStream] = {}  # submitted, not finished yet
        self._ids = itertools.count()
        # Two locks: the reader thread takes only _lock, never the sending one, so it keeps draining the child's
        # events while a sender waits for room in the socket (the child reads again after its send): no deadlock.
        self._lock = threading.Lock()  # _streams, _alive, _closed
        self._send_lock = threading.Lock()  # one whole message at a time on the socket
        self._closed = False
        self._alive = False
        self._stats: dict[str, float] = {}
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOTSTRAP, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            self._conn.close()
            raise
        finally:
            theirs.close()
        try:
            self._conn.send_bytes(pickle.dumps(sys.path))
            setup = {"model": model, "tokenizer": tokenizer, "max_rows": self._rows, "exact": exact}
            self._conn.send_bytes(pickle.dumps({**setup, "threads": threads}, pickle.HIGHEST_PROTOCOL))
            if not self._conn.poll(start_timeout_s):
                raise EngineError(f"the decoding process did not start within {start_timeout_s:g} s")
            kind, *rest = pickle.loads(self._conn.recv_bytes())
            if kind != "ready":
                raise EngineError(f"the decoding process failed to start: {rest[0]}")
            self._stats = rest[0]
        except (EOFError, OSError) as exc:
            self._stop_child(wait_s=5)
            raise EngineError(
                f"the decoding process failed to start (exit code {self._proc.returncode})"
            ) from exc
        except BaseException:
            self._stop_child(wait_s=5)
            raise
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="lmlab-engine-reader", daemon=True)
        self._reader.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """As ``Engine.submit``; EngineError when the decoding process is gone or closed."""
        loop = asyncio.get_running_loop()
        prompt = _checked_prompt(prompt_ids, params, self._vocab)
        with self._lock:
            if not self._alive or self._closed:
                raise EngineGone("the engine is closed" if self._closed else "the decoding process is gone")
            if len(self._streams) >= self.max_waiting + self._rows:  # every row busy, max_waiting waiting
                raise EngineFull(
                    f"{len(self._streams) - self._rows} requests are waiting for a row already "
                    f"(max_waiting={self.max_waiting}, all {self._rows} rows busy)"
                )
            rid = next(self._ids)
            stream = RequestStream(loop, functools.partial(self._cancel, rid), self.stream_interval)
            self._streams[rid] = stream
        try:
            self._send(("submit", rid, prompt, params, time.perf_counter()))
        except EngineError:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        return stream

    @property
    def alive(self) -> bool:
        """Whether the decoding process runs (False once closed)."""
        return self._alive and not self._closed

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: the queue and occupancy as of now (every request submitted and not
        finished holds a row or waits for one), the counters as of the child's last message."""
        with self._lock:
            stats, open_requests = dict(self._stats), len(self._streams)
        running = min(open_requests, self._rows)
        stats.update(
            waiting=float(open_requests - running), running=float(running), occupancy=running / self._rows
        )
        return stats

    def close(self) -> None:
        """Stop the child; every waiting or running request ends "cancelled"."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(EngineError):  # a child that died already: nothing to tell
            self._send(("close",))
        self._reader.join(timeout=60)  # the child sends its last events, then exits: end-of-file
        self._stop_child()

    def _send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError as exc:
            self._alive = False
            raise EngineGone("the decoding process is gone") from exc

    def _cancel(self, rid: int) -> None:
        with self._lock:
            wanted = self._alive and rid in self._streams
        if wanted:
            with contextlib.suppress(EngineError):
                self._send(("cancel", rid))

    def _read(self) -> None:
        try:
            while True:
                items, stats = pickle.loads(self._conn.recv_bytes())
                ready = []
                with self._lock:
                    self._stats = stats  # before the events: whoever reads a Finished sees its row free
                    for rid, events, admitted_step, finished_step in items:
                        stream = self._streams.get(rid)
                        if stream is None:
                            continue
                        stream.admitted_step, stream.finished_step = admitted_step, finished_step
                        if isinstance(events[-1], (Finished, BaseException)):
                            del self._streams[rid]
                            if isinstance(events[-1], Finished):
                                stream.finished = events[-1]
                        ready.append((stream, events))
                _deliver(ready)
        except (EOFError, OSError):
            pass  # the child exited
        except Exception:
            log.exception("reading from the decoding process failed")
        finally:
            with self._lock:
                self._alive = False
                orphans = list(self._streams.values())
                self._streams.clear()
            if orphans:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=1)  # it closed its end as it exited: its exit code is near
                code = self._proc.returncode
                error = EngineGone(f"the decoding process ended (exit code {code}) before these requests")
                _deliver([(stream, [error]) for stream in orphans])

    def _stop_child(self, wait_s: float = 30.0) -> None:
        """Close our end (the child reads end-of-file and exits), wait for it, kill it if it does not."""
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# The child's first lines: only the standard library until it has the parent's sys.path.
_CHILD_BOOTSTRAP = (
    "import pickle, sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = pickle.loads(conn.recv_bytes())\n"
    "from lmplatform.engine import _child_main\n"
    "_child_main(conn)\n"
)


class _ChildStream:
    """What the child's scheduler keeps of a request's stream: its id, cancel flag and steps."""

    __slots__ = ("rid", "cancelled", "admitted_step", "finished_step", "finished")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.cancelled = False
        self.admitted_step: int | None = None
        self.finished_step: int | None = None
        self.finished: Finished | None = None


def _child_main(conn: Connection) -> None:
    """The decoding process: ``Engine._run``'s loop, with messages from the parent instead of calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the parent's to handle
    try:
        with warnings.catch_warnings():  # an int8 model's unpickling repeats what lm.precision silenced
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
            warnings.filterwarnings(
                "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel"
            )
            setup = pickle.loads(conn.recv_bytes())
        torch.set_num_threads(setup["threads"])
        core = _Core(setup["model"], setup["tokenizer"], setup["max_rows"], setup["exact"])
    except Exception as exc:
        conn.send_bytes(pickle.dumps(("failed", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(pickle.dumps(("ready", _stats(core, 0, 0))))
    waiting: collections.deque[_Request] = collections.deque()
    streams: dict[int, _ChildStream] = {}

    def send(results: Sequence[tuple[_Request, Sequence[Event | BaseException]]]) -> None:
        items = []
        for request, events in results:
            stream = request.stream
            if events:
                items.append((stream.rid, list(events), stream.admitted_step, stream.finished_step))
                if isinstance(events[-1], (Finished, BaseException)):
                    streams.pop(stream.rid, None)
        stats = _stats(core, len(waiting), len(core.rows))
        conn.send_bytes(pickle.dumps((items, stats), pickle.HIGHEST_PROTOCOL))

    def receive(block: bool) -> bool:
        """Take every message there is (wait for one when ``block``); False once the parent says close."""
        if not conn.poll(None if block else 0):
            return True
        while True:
            kind, *rest = pickle.loads(conn.recv_bytes())
            if kind == "submit":
                rid, prompt, params, t_submit = rest
                streams[rid] = stream = _ChildStream(rid)
                request = core.request(prompt, params, stream)  # type: ignore[arg-type]
                request.t_submit = t_submit  # the parent's clock (perf_counter is system-wide)
                waiting.append(request)
            elif kind == "cancel" and rest[0] in streams:
                streams[rest[0]].cancelled = True
            elif kind == "close":
                return False
            if not conn.poll(0):
                return True

    try:
        while receive(block=not (core.rows or waiting)):
            admit, gone = _admissions(core, waiting)
            if gone:
                send(gone)
            if admit or core.rows:
                _step(core, admit, send)
        send(_cancel_all(core, waiting))
    except (EOFError, OSError):
        pass  # the parent is gone: nobody to tell
    finally:
        conn.close()


def _step(
    core: _Core, admit: list[_Request], deliver: Callable[[list[tuple[_Request, list[Any]]]], None]
) -> None:
    """One scheduler step (both engines): ``deliver`` gets the new rows' first tokens, then the step's events.
    A bug or a device error fails every request in a row, and the engine keeps serving the next ones."""
    try:
        results = core.step(admit, first=deliver)
    except Exception as exc:
        log.exception("engine step failed")
        error = EngineError(f"decoding failed: {type(exc).__name__}: {exc}")
        failed = [(r, [error]) for r in [*core.rows.values(), *admit]]
        core.drop_all()  # before delivering: whoever reads the error sees the rows free
        deliver(failed)
        return
    deliver(results)


def _cancel_all(core: _Core, waiting: Sequence[_Request]) -> list[tuple[_Request, list[Any]]]:
    """The "cancelled" ends of every running and waiting request, as the engine closes; frees every row."""
    ended = [(r, core.finish(r, "cancelled")) for r in [*core.rows.values(), *waiting]]
    core.drop_all()
    return ended


def _stats(core: _Core, waiting: int, running: int) -> dict[str, float]:
    return {
        "waiting": float(waiting),
        "running": float(running),
        "max_batch_size": float(core.decoder.max_rows),  # 1 in mode "none"
        "occupancy": running / core.decoder.max_rows,
        "decode_steps": float(core.steps),
        "tokens_generated": float(core.tokens_generated),
        "prefill_tokens": float(core.decoder.prefill_tokens),
        "decode_tokens": float(core.decoder.decode_tokens),
        "requests_finished": float(core.requests_finished),
        "requests_cancelled": float(core.requests_cancelled),
        "windowed": float(core.decoder.windowed),
    }


def _admissions(
    core: _Core, waiting: collections.deque[_Request]
) -> tuple[list[_Request], list[tuple[_Request, list[Event]]]]:
    """The requests that take free rows at this step (in arrival order), and the events of those that left:
    cancelled while waiting, or cancelled in a row (which a waiting request then takes at once)."""
    gone = []
    for request in [r for r in waiting if r.stream.cancelled]:
        waiting.remove(request)
        gone.append((request, core.finish(request, "cancelled")))
    gone += core.retire_cancelled()
    admit: list[_Request] = []
    while waiting and len(admit) < core.decoder.free_rows():
        admit.append(waiting.popleft())
    return admit, gone


def decode_static(
    model: TransformerLM,
    tokenizer: Tokenizer,
    requests: list[tuple[list[int], SamplingParams]],
    cancelled: list[threading.Event] | None = None,
) -> Iterator[list[Delta | Finished | None]]:
    """Decode one batch together (rows at different positions): one list per decode step, one slot per row:
    a Delta (empty when its text is held back this step), then the row's Finished in the list after its last
    Delta, then None once it has finished. What the "static" mode's ``@serve.batch`` handler wraps."""
    if cancelled is not None and len(cancelled) != len(requests):
        raise ValueError(f"{len(cancelled)} cancel flags for {len(requests)} requests")
    if not requests:
        return iter(())
    core = _Core(model, tokenizer, len(requests))
    streams = [RequestStream(None, None) for _ in requests]
    if cancelled is not None:
        for stream, flag in zip(streams, cancelled):
            stream._cancelled = flag
    batch = [core.request(ids, params, stream) for (ids, params), stream in zip(requests, streams)]
    return _static_steps(core, batch)


def _static_steps(core: _Core, batch: list[_Request]) -> Iterator[list[Delta | Finished | None]]:
    queues: list[collections.deque[Event]] = [collections.deque() for _ in batch]
    slot = {id(r): i for i, r in enumerate(batch)}
    done = [False] * len(batch)
    admit = batch
    while admit or core.rows or any(queues):
        if admit or core.rows:
            for request, events in core.step(admit):
                queues[slot[id(request)]].extend(events)  # type: ignore[arg-type]
            admit = []
        out: list[Delta | Finished | None] = []
        for i, (request, queue) in enumerate(zip(batch, queues)):
            if queue:
                out.append(queue.popleft())
                done[i] = isinstance(out[-1], Finished)
            else:  # still decoding but nothing to send (held back), or finished in an earlier list
                out.append(
                    None if done[i] else Delta("", [], None if request.params.logprobs is None else [])
                )
        yield out


# ------------------------------------------------------------------------------------------------------------
# The decoding core shared by Engine and decode_static: rows, sampling, detokenization, stop strings.


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    prompt_tokens: int
    params: SamplingParams
    stream: RequestStream
    generator: torch.Generator
    t_submit: float
    handle: int | None = None
    pending: int = 0  # the sampled token the next step feeds
    completion_tokens: int = 0
    text: str = ""  # every character decoded so far
    emitted: int = 0  # characters of text already sent
    held: list[tuple[int, int, TokenLogprob | None]] = field(default_factory=list)  # (id, text offset, lp)
    t_first: float | None = None
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )


class _Core:
    def __init__(
        self, model: TransformerLM, tokenizer: Tokenizer, max_rows: int, exact: bool = False
    ) -> None:
        if model.training:
            model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = BatchDecoder(model, max_rows, fixed_shape=exact)
        # A model may have more ids than its tokenizer (a small corpus stops BPE early): those have no text.
        self.token_bytes = token_bytes(tokenizer) + [b""] * max(
            0, model.cfg.vocab_size - tokenizer.vocab_size
        )
        self.eos_id = tokenizer.eos_id
        self.rows: dict[int, _Request] = {}  # handle -> request
        self.steps = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.requests_cancelled = 0

    def request(self, prompt_ids: Sequence[int], params: SamplingParams, stream: RequestStream) -> _Request:
        prompt = _checked_prompt(prompt_ids, params, self.model.cfg.vocab_size)
        seed = secrets.randbits(63) if params.seed is None else params.seed % (1 << 64)
        return _Request(
            prompt=prompt or [self.eos_id],  # an empty prompt starts a new document
            prompt_tokens=len(prompt),
            params=params,
            stream=stream,
            generator=torch.Generator().manual_seed(seed),
            t_submit=time.perf_counter(),
        )

    def step(
        self, admit: list[_Request], first: Callable[[list[tuple[_Request, list[Event]]]], None] | None = None
    ) -> list[tuple[_Request, list[Event]]]:
        """One step: retire cancelled rows, advance the live rows by one token, prefill ``admit`` and sample
        their first tokens. With ``first`` (the engine's scheduler), the prefill comes first and ``first``
        receives its events before the decode forward runs, which then advances the new rows too: a new
        request's first token never waits for the batch's step. Without it (static batches), one token per
        row per step."""
        results = self.retire_cancelled()
        if first is None and self.rows:
            results += self._decode()
        prefill: list[_Request] = []
        for request in admit:
            request.stream.admitted_step = self.steps
            if request.stream.cancelled:
                results.append((request, self.finish(request, "cancelled")))
            elif request.params.max_new_tokens == 0:
                results.append((request, self.finish(request, "length")))
            else:
                prefill.append(request)
        if prefill:  # one padded forward for every new row (one each in exact mode)
            handles, logits = self.decoder.admit_many([r.prompt for r in prefill])
            for request, handle in zip(prefill, handles):
                request.handle = handle
                self.rows[handle] = request
            results += self._sample_all(logits, prefill)
        if first is not None:
            if results:
                first(results)
                results = []
            if self.rows:
                results += self._decode()
        self.steps += 1
        return results

    def _decode(self) -> list[tuple[_Request, list[Event]]]:
        logits = self.decoder.step({h: r.pending for h, r in self.rows.items()})
        return self._sample_all(logits, [self.rows[h] for h in self.decoder.live])

    def _sample_all(self, logits: Tensor, rows: list[_Request]) -> list[tuple[_Request, list[Event]]]:
        """Sample one token per row from its logits (n, V) and advance the row (its events)."""
        tokens = self._sample(logits, rows)
        logprobs = self._logprobs(logits, rows, tokens)
        now = time.perf_counter()
        return [(r, self._advance(r, token, lp, now)) for r, token, lp in zip(rows, tokens, logprobs)]

    def retire_cancelled(self) -> list[tuple[_Request, list[Event]]]:
        """Free the rows of cancelled requests (their Finished events)."""
        gone = [r for r in self.rows.values() if r.stream.cancelled]
        return [(request, self.finish(request, "cancelled")) for request in gone]

    def finish(self, request: _Request, reason: str, text_end: int | None = None) -> list[Event]:
        """The last events of ``request`` (remaining text, then Finished); frees its row."""
        events: list[Event] = []
        if reason != "cancelled":
            if text_end is None:
                request.text += request.utf8.decode(b"", final=True)  # a dangling partial character
            end = len(request.text) if text_end is None else text_end
            delta = self._release_text(request, end, final=True)
            if delta is not None:
                events.append(delta)
        if request.handle is not None:
            self.decoder.release(request.handle)
            del self.rows[request.handle]
            request.handle = None
        finished = Finished(
            reason=reason,
            text=request.text[: request.emitted],
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            time_to_first_token_s=None if request.t_first is None else request.t_first - request.t_submit,
            total_s=time.perf_counter() - request.t_submit,
        )
        request.stream.finished = finished
        request.stream.finished_step = self.steps
        self.requests_finished += 1
        self.requests_cancelled += reason == "cancelled"
        events.append(finished)
        return events

    def drop_all(self) -> None:
        for handle in self.decoder.live:  # also a row admitted by a step that failed half-way
            self.decoder.release(handle)
        self.rows.clear()

    def _sample(self, logits: Tensor, rows: list[_Request]) -> list[int]:
        groups: dict[tuple[float, int | None, float | None], list[int]] = {}
        for i, request in enumerate(rows):
            p = request.params
            key = (float(p.temperature), p.top_k or None, p.top_p if p.top_p != 1.0 else None)
            groups.setdefault(key, []).append(i)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for (temperature, top_k, top_p), members in groups.items():
            index = torch.tensor(members, device=logits.device)
            sub = logits.index_select(0, index)  # (m, V)
            if temperature == 0.0:
                tokens[index] = sample_next(sub, temperature=0.0)  # argmax; draws nothing
                continue
            cdf = filter_logits(sub, temperature, top_k, top_p).softmax(dim=-1).cumsum(dim=-1)  # (m, V)
            # One uniform in (0, 1] per row from the row's own generator: the draw never depends on the batch.
            u = torch.tensor([1.0 - torch.rand((), generator=rows[i].generator).item() for i in members])
            u = u.to(logits.device).unsqueeze(1) * cdf[:, -1:]  # (m, 1)
            tokens[index] = (cdf < u).sum(dim=-1).clamp_(max=cdf.size(-1) - 1)  # first token whose cdf >= u
        return tokens.tolist()

    def _logprobs(self, logits: Tensor, rows: list[_Request], tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return out
        index = torch.tensor(wanted, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # the model's distribution
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in wanted], device=lp.device).unsqueeze(1))
        k = max(rows[i].params.logprobs or 0 for i in wanted)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        chosen_l, top_vl, top_il = chosen.squeeze(1).tolist(), top_v.tolist(), top_i.tolist()
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs or 0
            top: dict[str, float] = {}
            for value, token in zip(top_vl[j][:n], top_il[j][:n]):
                top.setdefault(self._text(token), value)
            out[i] = TokenLogprob(token=self._text(tokens[i]), logprob=chosen_l[j], top=top)
        return out

    def _text(self, token: int) -> str:
        return self.token_bytes[token].decode("utf-8", errors="replace")

    def _advance(self, request: _Request, token: int, lp: TokenLogprob | None, now: float) -> list[Event]:
        request.completion_tokens += 1
        self.tokens_generated += 1
        if request.t_first is None:
            request.t_first = now
        if token == self.eos_id:
            return self.finish(request, "eos")
        request.pending = token
        request.held.append((token, len(request.text), lp))
        request.text += request.utf8.decode(self.token_bytes[token])
        last = request.completion_tokens >= request.params.max_new_tokens
        if last:
            request.text += request.utf8.decode(b"", final=True)  # a dangling partial character
        stops = request.params.stop
        if stops:
            hits = [i for i in (request.text.find(s, request.emitted) for s in stops) if i >= 0]
            if hits:
                return self.finish(request, "stop", text_end=min(hits))
        if last:
            return self.finish(request, "length")
        end = len(request.text) - _held_back(request.text, request.emitted, stops)
        delta = self._release_text(request, end, final=False)
        return [delta] if delta is not None else []

    def _release_text(self, request: _Request, end: int, final: bool) -> Delta | None:
        """A Delta of text[emitted:end] with the held tokens that start before ``end`` (all of them when the
        whole text goes out at the end), or None when there is nothing to send."""
        end = max(end, request.emitted)
        everything = final and end == len(request.text)
        taken = [h for h in request.held if everything or h[1] < end]
        request.held = [] if final else request.held[len(taken) :]
        text = request.text[request.emitted : end]
        request.emitted = end
        if not text and not taken:
            return None
        want = request.params.logprobs is not None
        return Delta(
            text=text,
            token_ids=[t for t, _, _ in taken],
            logprobs=[lp for _, _, lp in taken if lp is not None] if want else None,
        )


def _held_back(text: str, emitted: int, stops: tuple[str, ...]) -> int:
    """How many final characters of text could begin a stop string, so must not be sent yet."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - emitted), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for (byte-level BPE: a token may hold part of a UTF-8 character)."""
    table = _TOKEN_BYTES.get(tokenizer)
    if table is None:
        table = _TOKEN_BYTES[tokenizer] = _token_bytes(tokenizer)
    return table


_TOKEN_BYTES: weakref.WeakKeyDictionary[Tokenizer, list[bytes]] = weakref.WeakKeyDictionary()


def _token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    hf = tokenizer.hf
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
    table = [b""] * tokenizer.vocab_size
    for piece, i in hf.get_vocab(with_added_tokens=True).items():
        if i in added:
            table[i] = added[i].encode("utf-8")
        elif all(c in byte_of for c in piece):
            table[i] = bytes(byte_of[c] for c in piece)
        else:  # not a byte-level token: its decoded text is the best we have
            table[i] = hf.decode([i], skip_special_tokens=False).encode("utf-8")
    return table


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _check_setup(mode: str, max_batch_size: int, max_waiting: int, stream_interval: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed: must be one of {', '.join(MODES)}")
    if not (_is_int(max_batch_size) and max_batch_size >= 1):
        raise ValueError(f"max_batch_size={max_batch_size!r} is not allowed: must be an integer >= 1")
    if not (_is_int(max_waiting) and max_waiting >= 0):
        raise ValueError(f"max_waiting={max_waiting!r} is not allowed: must be an integer >= 0")
    if not (_is_number(stream_interval) and 0 <= stream_interval < math.inf):
        raise ValueError(
            f"stream_interval={stream_interval!r} is not allowed: must be a number of seconds >= 0"
        )


def _checked_prompt(prompt_ids: Sequence[int], params: SamplingParams, vocab: int) -> list[int]:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    prompt = [int(i) for i in prompt_ids]
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return prompt


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: must be {allowed}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
