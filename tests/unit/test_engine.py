"""Tests for lmplatform/engine.py (no Ray, no HTTP): continuous batching gives each request what it gets alone,
stop strings and split characters never leak, EOS/length/cancel, backpressure, scheduling order in steps,
decode_static's slots, windowing past block_size."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from lmplatform.engine import (
    Delta,
    Engine,
    EngineError,
    EngineFull,
    Finished,
    ProcessEngine,
    SamplingParams,
    decode_static,
    token_bytes,
)

from bench.procs import alive
from lm.config import ModelConfig
from lm.model import RowKVCache, TransformerLM
from lm.tokenizer import Tokenizer, train_tokenizer

BLOCK = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy shapes: one thread is fastest
# Every engine test runs against both schedulers: a thread of this process, and a child process.
ENGINES = pytest.mark.parametrize("engine_class", [Engine, ProcessEngine], ids=["thread", "process"])


@pytest.fixture(scope="module")
def tok(small_text: str) -> Tokenizer:
    return train_tokenizer([small_text], vocab_size=320)


def tiny(tok: Tokenizer, seed: int = 0, cls: type[TransformerLM] = TransformerLM) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    return cls(cfg).eval()


class ScriptedLM(TransformerLM):
    """A real model whose logits are replaced so that, after a one-token prompt, it emits ``script`` in order."""

    def __init__(self, cfg: ModelConfig, script: list[int]) -> None:
        super().__init__(cfg)
        self.script = script

    def forward_rows(
        self, idx: torch.Tensor, cache: RowKVCache, rows: slice | None = None, last_only: bool = False, **kw
    ) -> torch.Tensor:
        rows = slice(0, idx.size(0)) if rows is None else rows
        super().forward_rows(idx, cache, rows, last_only, **kw)
        lengths = cache.lengths[rows]  # tokens seen by each row: the next one is script[length - 1]
        logits = torch.full((len(lengths), self.cfg.vocab_size), -10.0)
        for r, n in enumerate(lengths):
            logits[r, self.script[(n - 1) % len(self.script)]] = 10.0
        return logits if last_only else logits.unsqueeze(1).expand(-1, idx.size(1), -1)


class NoEosLM(TransformerLM):
    """A real model that never samples end-of-text (its logit is -inf)."""

    eos_id = 0

    def forward_rows(self, *args, **kw) -> torch.Tensor:
        logits = super().forward_rows(*args, **kw)
        logits[..., self.eos_id] = float("-inf")
        return logits


class PoisonedLM(ScriptedLM):
    """A scripted model whose forward fails on any row holding token POISON: a device error, for one request."""

    POISON = 7

    def forward_rows(self, idx: torch.Tensor, *args, **kw) -> torch.Tensor:
        if (idx == self.POISON).any():
            raise RuntimeError("device lost")
        return super().forward_rows(idx, *args, **kw)


def scripted(
    tok: Tokenizer, script: list[int], extra_ids: int = 0, cls: type[ScriptedLM] = ScriptedLM
) -> ScriptedLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size + extra_ids, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)
    return cls(cfg, script).eval()


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte (the byte-level alphabet's single-byte tokens)."""
    table = token_bytes(tok)
    single = {b[0]: i for i, b in enumerate(table) if len(b) == 1 and i not in (tok.eos_id, tok.pad_id)}
    return [single[b] for b in data]


def run(coro):
    return asyncio.run(coro)


async def collect_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    streams = [engine.submit(ids, params) for ids, params in requests]
    return await asyncio.gather(*(s.collect() for s in streams))


def ids_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def check_consistent(deltas: list[Delta], fin: Finished) -> None:
    assert "".join(d.text for d in deltas) == fin.text
    assert all(d.text for d in deltas[:-1])  # only a final flush may carry tokens without text


MIXED = [  # (prompt, params): mixed lengths, greedy and seeded sampling with their own filters
    ("ROMEO:", SamplingParams(max_new_tokens=40, temperature=0.0)),
    ("First Citizen:\nBefore we proceed any further, hear me speak.", SamplingParams(25, 0.9, seed=7)),
    ("A", SamplingParams(max_new_tokens=12, temperature=1.2, top_k=40, seed=1)),
    ("What, ho! Apothecary!", SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=3)),
    ("\n", SamplingParams(max_new_tokens=20, temperature=0.0)),
    ("MENENIUS:\nI tell you, friends", SamplingParams(max_new_tokens=18, temperature=1.0, seed=11, top_k=5)),
]


async def first_event(stream):
    return await stream.__aiter__().__anext__()


async def after(stream, first) -> tuple[list[Delta], Finished]:
    """The stream's events, given the first one already read (collect() continues the same iterator)."""
    if isinstance(first, Finished):
        return [], first
    deltas, fin = await stream.collect()
    return [first, *deltas], fin


@ENGINES
@pytest.mark.parametrize("arrivals", ["staggered", "burst"])
def test_batched_requests_get_the_tokens_they_get_alone(
    engine_class: type[Engine], tok: Tokenizer, arrivals: str
) -> None:
    """Greedy and seeded sampling, mixed lengths, staggered arrivals (or all at once: one padded prefill),
    windowing past block_size included."""
    model = tiny(tok)
    requests = [(tok.encode(p), params) for p, params in MIXED]

    async def alone():
        engine = engine_class(model, tok, mode="none")
        try:
            return [await engine.submit(ids, params).collect() for ids, params in requests]
        finally:
            engine.close()

    async def batched():
        engine = engine_class(model, tok, max_batch_size=4)  # fewer rows than requests: some wait for a row
        try:
            streams, firsts = [], []
            for ids, params in requests:
                streams.append(engine.submit(ids, params))
                if arrivals == "staggered":  # the next request arrives while this one decodes
                    firsts.append(await first_event(streams[-1]))
            for stream in streams[len(firsts) :]:  # burst: all submitted before any is read
                firsts.append(await first_event(stream))
            return [await after(s, first) for s, first in zip(streams, firsts)], engine.stats()
        finally:
            engine.close()

    solo = run(alone())
    together, stats = run(batched())
    for (d1, f1), (d2, f2) in zip(solo, together):
        assert ids_of(d1) == ids_of(d2)
        assert (f1.text, f1.reason, f1.completion_tokens) == (f2.text, f2.reason, f2.completion_tokens)
        check_consistent(d2, f2)
    assert solo[0][1].completion_tokens == 40  # past block_size (prompt + 40 > 32): windowing kept going
    assert stats["windowed"] >= 1
    assert stats["requests_finished"] == len(MIXED) and stats["running"] == 0 and stats["waiting"] == 0


@ENGINES
def test_stop_strings_never_leak_also_split_across_tokens(engine_class: type[Engine], tok: Tokenizer) -> None:
    script = byte_ids(tok, b"xySTOxzSTOPabc")  # "STO" is held back, then released when "x" breaks it
    model = scripted(tok, script)

    async def go():
        engine = engine_class(model, tok)
        try:
            return await collect_all(
                engine,
                [
                    ([5], SamplingParams(max_new_tokens=20, temperature=0.0, stop=("STOP",))),
                    ([5], SamplingParams(max_new_tokens=20, temperature=0.0, stop=("zz", "zSTO", "STOP"))),
                    ([5], SamplingParams(max_new_tokens=20, temperature=0.0, stop=["OPa"])),
                    ([5], SamplingParams(max_new_tokens=5, temperature=0.0, stop=("STOP",))),
                ],
            )
        finally:
            engine.close()

    (d1, f1), (d2, f2), (d3, f3), (d4, f4) = run(go())
    assert (f1.reason, f1.text) == ("stop", "xySTOxz")
    assert [d.text for d in d1] == ["x", "y", "STOx", "z"]  # never a piece of "STOP" that then matched
    assert (f2.reason, f2.text) == ("stop", "xySTOx")  # the earliest of several stop strings wins
    assert (f3.reason, f3.text) == ("stop", "xySTOxzST")
    assert (f4.reason, f4.text) == ("length", "xySTO")  # a held-back prefix is released at the end
    assert f1.completion_tokens == 11  # every sampled token counts, the stop string's too
    assert ids_of(d1) == script[:7]  # the tokens whose text is in the completion
    for deltas, fin in ((d1, f1), (d2, f2), (d3, f3), (d4, f4)):
        check_consistent(deltas, fin)


@ENGINES
def test_stop_string_split_inside_multi_character_tokens(engine_class: type[Engine], tok: Tokenizer) -> None:
    text = "ROMEO: But soft, what light through yonder window breaks"
    script = tok.encode(text)
    pieces = [tok.decode([t]) for t in script]
    i = next(i for i in range(3, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[i - 1][-2:] + pieces[i][:2]  # straddles the boundary between two BPE tokens
    expected = text[: text.find(stop)]
    model = scripted(tok, script)

    async def go():
        engine = engine_class(model, tok)
        try:
            params = SamplingParams(max_new_tokens=len(script), temperature=0.0, stop=(stop,))
            return await engine.submit([5], params).collect()
        finally:
            engine.close()

    deltas, fin = run(go())
    assert (fin.reason, fin.text) == ("stop", expected)
    assert all(stop not in d.text for d in deltas)
    check_consistent(deltas, fin)


@ENGINES
def test_characters_split_across_tokens_are_never_sent_half(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    data = "é€x—🙂".encode()
    model = scripted(tok, byte_ids(tok, data))

    async def go():
        engine = engine_class(model, tok)
        try:
            return await collect_all(
                engine,
                [
                    ([5], SamplingParams(max_new_tokens=len(data), temperature=0.0, logprobs=1)),
                    ([5], SamplingParams(max_new_tokens=4, temperature=0.0)),  # ends inside "€"
                ],
            )
        finally:
            engine.close()

    (d1, f1), (d2, f2) = run(go())
    assert [d.text for d in d1] == ["é", "€", "x", "—", "🙂"]
    assert all("\ufffd" not in d.text for d in d1)
    assert [len(d.token_ids) for d in d1] == [2, 3, 1, 3, 4] == [len(d.logprobs) for d in d1]
    assert f1.text == "é€x—🙂" and f1.completion_tokens == len(data)
    assert f2.text == "é\ufffd" and f2.reason == "length"  # an unfinished character at the end is replaced
    check_consistent(d2, f2)


@ENGINES
def test_eos_ends_a_request_without_its_text(engine_class: type[Engine], tok: Tokenizer) -> None:
    script = [*byte_ids(tok, b"ab"), tok.eos_id, *byte_ids(tok, b"c")]
    model = scripted(tok, script)

    async def go():
        engine = engine_class(model, tok)
        try:
            return await engine.submit(
                [5], SamplingParams(max_new_tokens=10, temperature=0.7, seed=1)
            ).collect()
        finally:
            engine.close()

    deltas, fin = run(go())
    assert (fin.reason, fin.text, fin.completion_tokens, fin.prompt_tokens) == ("eos", "ab", 3, 1)
    assert ids_of(deltas) == script[:2]
    assert fin.time_to_first_token_s is not None and 0 <= fin.time_to_first_token_s <= fin.total_s


@ENGINES
def test_length_limit_and_zero_tokens(engine_class: type[Engine], tok: Tokenizer) -> None:
    model = tiny(tok)

    async def go():
        engine = engine_class(model, tok)
        try:
            return await collect_all(
                engine,
                [
                    (tok.encode("KING"), SamplingParams(max_new_tokens=7, temperature=0.0)),
                    (tok.encode("KING"), SamplingParams(max_new_tokens=0)),
                    ([], SamplingParams(max_new_tokens=3, temperature=0.0)),  # empty prompt: starts at EOS
                ],
            )
        finally:
            engine.close()

    (d1, f1), (d2, f2), (d3, f3) = run(go())
    assert f1.reason == "length" and f1.completion_tokens == 7
    assert (d2, f2.reason, f2.text, f2.completion_tokens, f2.time_to_first_token_s) == (
        [],
        "length",
        "",
        0,
        None,
    )
    assert f3.prompt_tokens == 0 and f3.completion_tokens == 3 or f3.reason == "eos"


@ENGINES
def test_logprobs_are_the_models_distribution(engine_class: type[Engine], tok: Tokenizer) -> None:
    model = tiny(tok)
    prompt = tok.encode("JULIET:")

    async def go():
        engine = engine_class(model, tok)
        try:
            return await collect_all(
                engine,
                [
                    (prompt, SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=5)),
                    (prompt, SamplingParams(max_new_tokens=6, temperature=0.5, seed=2, logprobs=0)),
                    (prompt, SamplingParams(max_new_tokens=6, temperature=0.0)),
                ],
            )
        finally:
            engine.close()

    (d1, _), (d2, _), (d3, _) = run(go())
    lps = [lp for d in d1 for lp in d.logprobs]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0][0, -1], dim=-1)
    first = ids_of(d1)[0]
    assert lps[0].logprob == pytest.approx(float(expected[first]), abs=1e-5)
    assert lps[0].token == tok.decode([first])
    for lp in lps:  # greedy: the chosen token is the most likely one, listed first among <= 5 alternatives
        assert 1 <= len(lp.top) <= 5 and lp.logprob == pytest.approx(max(lp.top.values()))
        assert list(lp.top.values()) == sorted(lp.top.values(), reverse=True)
    assert all(lp.top == {} and lp.logprob <= 0 for d in d2 for lp in d.logprobs)
    assert all(d.logprobs is None for d in d3)


@ENGINES
def test_cancel_frees_the_row_within_one_step_for_a_waiting_request(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    # No EOS: only the cancel stops it. Each step takes 20 ms: the process engine's counters are those of the
    # child's last message, and with sub-millisecond steps a loaded machine let the reader fall a step behind.
    model = scripted(tok, byte_ids(tok, b"never ending "), cls=PacedLM)

    async def go():
        engine = engine_class(model, tok, max_batch_size=1)
        try:
            long = engine.submit(tok.encode("To be"), SamplingParams(max_new_tokens=100_000, temperature=1.0))
            waiting = engine.submit(tok.encode("or not"), SamplingParams(max_new_tokens=3, temperature=0.0))
            await first_event(long)
            for _ in range(200):  # let it decode a few steps
                await asyncio.sleep(0.001)
            step_at_cancel = engine.stats()["decode_steps"]
            long.cancel()
            _, fin = await long.collect()
            await waiting.collect()
            return long, waiting, step_at_cancel, fin, engine.stats()
        finally:
            engine.close()

    long, waiting, step_at_cancel, fin, stats = run(go())
    assert fin.reason == "cancelled" and 0 < fin.completion_tokens < 100_000
    assert long.finished_step <= step_at_cancel + 2  # the step in flight, then the next one frees it
    assert waiting.admitted_step == long.finished_step  # the waiting request takes the row at once
    assert stats["requests_cancelled"] == 1 and stats["running"] == 0


@ENGINES
def test_breaking_off_a_stream_cancels_it(engine_class: type[Engine], tok: Tokenizer) -> None:
    model = scripted(tok, byte_ids(tok, b"never ending "))

    async def go():
        engine = engine_class(model, tok, max_batch_size=2)
        try:
            stream = engine.submit(tok.encode("Now"), SamplingParams(max_new_tokens=100_000, temperature=1.0))
            async for _ in stream:
                break
            await stream.__aiter__().aclose()  # what a server does when the client disconnects
            for _ in range(500):
                if engine.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            return stream, engine.stats()
        finally:
            engine.close()

    stream, stats = run(go())
    assert stream.cancelled and stats["running"] == 0 and stats["requests_cancelled"] == 1


@ENGINES
@pytest.mark.parametrize("max_waiting", [0, 2])
def test_a_full_waiting_queue_raises_engine_full(
    engine_class: type[Engine], tok: Tokenizer, max_waiting: int
) -> None:
    model = scripted(tok, byte_ids(tok, b"never ending "))  # no EOS: rows stay busy until cancelled

    async def go():
        engine = engine_class(model, tok, max_batch_size=2, max_waiting=max_waiting)
        streams = []
        try:
            with pytest.raises(EngineFull, match="max_waiting"):
                for _ in range(10):  # two get a row, max_waiting more wait, the next is refused
                    streams.append(engine.submit([5], SamplingParams(max_new_tokens=10_000)))
            refused_stats = engine.stats()
            for stream in streams:
                stream.cancel()
            results = [await s.collect() for s in streams]
            late = await engine.submit([5], SamplingParams(max_new_tokens=2)).collect()  # room again
            return results, late, refused_stats
        finally:
            engine.close()

    results, late, stats = run(go())
    assert len(results) == 2 + max_waiting and all(f.reason == "cancelled" for _, f in results)
    assert stats["running"] + stats["waiting"] == 2 + max_waiting
    assert late[1].completion_tokens == 2


@ENGINES
@pytest.mark.parametrize("mode", ["continuous", "none"])
def test_a_short_request_after_a_long_one_finishes_first_only_when_continuous(
    engine_class: type[Engine], tok: Tokenizer, mode: str
) -> None:
    model = tiny(tok)

    async def go():
        engine = engine_class(model, tok, max_batch_size=4, mode=mode)
        try:
            long = engine.submit(tok.encode("Long"), SamplingParams(max_new_tokens=60, temperature=0.0))
            await first_event(long)  # the long one is decoding
            short = engine.submit(tok.encode("Short"), SamplingParams(max_new_tokens=5, temperature=0.0))
            await short.collect()
            await long.collect()
            return long, short
        finally:
            engine.close()

    long, short = run(go())
    if mode == "continuous":
        assert short.finished_step < long.finished_step
        # The admitting step samples the prefill's token and decodes the next; then one token per step
        assert short.finished_step - short.admitted_step == 3
    else:
        assert short.admitted_step >= long.finished_step and short.finished_step > long.finished_step


@ENGINES
def test_decode_static_gives_one_slot_per_row_until_each_finishes(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    model = tiny(tok)
    requests = [(tok.encode(p), params) for p, params in MIXED[:4]]
    steps = list(decode_static(model, tok, requests))
    assert all(len(slots) == len(requests) for slots in steps)
    for row in range(len(requests)):
        events = [slots[row] for slots in steps]
        end = next(i for i, e in enumerate(events) if isinstance(e, Finished))
        assert all(e is None for e in events[end + 1 :])  # None only once a row has finished
        assert all(isinstance(e, Delta) for e in events[:end])
        deltas = [e for e in events[:end] if e.text or e.token_ids]
        check_consistent(deltas, events[end])
    assert len(steps) <= max(p.max_new_tokens for _, p in requests) + 1

    async def alone():  # the same tokens as the engine gives each request alone
        engine = engine_class(model, tok, mode="none")
        try:
            return [await engine.submit(ids, params).collect() for ids, params in requests]
        finally:
            engine.close()

    for row, (deltas, _) in enumerate(run(alone())):
        static = [slots[row] for slots in steps if isinstance(slots[row], Delta)]
        assert ids_of(static) == ids_of(deltas)


def test_decode_static_honours_cancel_flags(tok: Tokenizer) -> None:
    model = tiny(tok)
    flags = [threading.Event(), threading.Event()]
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    it = decode_static(model, tok, [([5], params), ([6], params)], cancelled=flags)
    next(it)
    flags[0].set()
    slots = next(it)
    assert isinstance(slots[0], Finished) and slots[0].reason == "cancelled"
    rest = list(it)
    assert all(s[0] is None for s in rest) and isinstance(rest[-1][1], Finished)
    assert list(decode_static(model, tok, [])) == []


@ENGINES
def test_generation_keeps_going_past_block_size_with_bounded_work(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    model = tiny(tok)
    n = 5 * BLOCK

    async def go():
        engine = engine_class(model, tok)
        try:
            out = await collect_all(engine, [(tok.encode("Hark"), SamplingParams(max_new_tokens=n, seed=0))])
            return out[0], engine.stats()
        finally:
            engine.close()

    (deltas, fin), stats = run(go())
    assert fin.reason in ("length", "eos")
    generated = fin.completion_tokens
    assert stats["decode_tokens"] == generated - 1  # the first token came from the prefill
    assert stats["windowed"] >= (generated - BLOCK) // BLOCK  # windowed, not cut off
    # Re-prefill: block/2 - 1 tokens per window, about one token per generated one, never a window per token.
    assert stats["prefill_tokens"] <= len(tok.encode("Hark")) + stats["windowed"] * (BLOCK // 2 - 1)
    assert stats["prefill_tokens"] < 1.2 * generated


class SlowLM(ScriptedLM):
    """A scripted model whose every forward takes at least ``delay`` seconds, like a real model under load."""

    delay = 0.01

    def forward_rows(self, *args, **kw) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward_rows(*args, **kw)


class PacedLM(SlowLM):
    """A scripted model whose steps take 20 ms."""

    delay = 0.02


@ENGINES
def test_a_paced_stream_sends_the_first_text_at_once_then_merged_text_and_never_holds_the_end(
    engine_class: type[Engine],
    tok: Tokenizer,
) -> None:
    text = b"abcdefghij" * 4
    script = byte_ids(tok, text)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    model = SlowLM(cfg, script).eval()
    interval = 1.0  # 40 steps of >= 10 ms (0.4 s idle, seconds on a busy machine): a few Deltas, not 40

    async def go():
        engine = engine_class(model, tok, stream_interval=interval)
        try:
            t0 = time.perf_counter()
            stream = engine.submit([5], SamplingParams(max_new_tokens=40, temperature=0.0))
            return t0, [(time.perf_counter(), event) async for event in stream]
        finally:
            engine.close()

    t0, got = run(go())
    deltas = [event for _, event in got if isinstance(event, Delta)]
    arrived = [t for t, event in got if isinstance(event, Delta)]
    t_end, fin = got[-1]
    assert isinstance(fin, Finished) and fin.reason == "length" and fin.text == text.decode()
    check_consistent(deltas, fin)  # merged Deltas keep every character and token, in order
    assert arrived[0] - t0 < interval / 2  # the first text is not held for the interval
    # Paced: one Delta per interval after the first (however slow the steps are on a busy machine), not 40.
    assert 2 <= len(deltas) <= 2 + (t_end - arrived[0]) / (interval * 0.9), [len(d.token_ids) for d in deltas]
    assert all(b - a >= interval * 0.9 for a, b in zip(arrived[1:-1], arrived[2:-1]))
    assert t_end - arrived[-1] < interval / 2  # the end comes with the last step, not an interval later
    with pytest.raises(ValueError, match="stream_interval"):
        engine_class(model, tok, stream_interval=-1)


class SlowDecodeLM(ScriptedLM):
    """A scripted model whose one-token decode forwards take 0.3 s and whose prefills (2+ tokens) are fast."""

    def forward_rows(self, idx: torch.Tensor, *args, **kw) -> torch.Tensor:
        if idx.size(1) == 1:
            time.sleep(0.3)
        return super().forward_rows(idx, *args, **kw)


@ENGINES
def test_a_new_requests_first_token_is_sent_before_the_batchs_decode_step(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    model = scripted(tok, byte_ids(tok, b"abcdefghij"), cls=SlowDecodeLM)

    async def go():
        engine = engine_class(model, tok, max_batch_size=4)
        try:
            long = engine.submit([5, 6], SamplingParams(max_new_tokens=8, temperature=0.0))
            await first_event(long)  # the long one is decoding, 0.3 s a step
            new = engine.submit([5, 6], SamplingParams(max_new_tokens=3, temperature=0.0))
            await first_event(new)
            step_at_first_token = engine.stats()["decode_steps"]
            await new.collect()
            await long.collect()
            return new, step_at_first_token
        finally:
            engine.close()

    new, step_at_first_token = run(go())
    # Its step had not finished (its decode forward was still running) when the first token arrived.
    assert step_at_first_token == new.admitted_step


def test_sampling_params_reject_bad_values() -> None:
    bad = [
        dict(max_new_tokens=-1),
        dict(max_new_tokens=1.5),
        dict(max_new_tokens=3, temperature=-0.1),
        dict(max_new_tokens=3, temperature=float("nan")),
        dict(max_new_tokens=3, top_k=-1),
        dict(max_new_tokens=3, top_p=0.0),
        dict(max_new_tokens=3, top_p=1.5),
        dict(max_new_tokens=3, stop=("",)),
        dict(max_new_tokens=3, logprobs=6),
        dict(max_new_tokens=3, seed="7"),
    ]
    for kwargs in bad:
        name = [k for k in kwargs if k != "max_new_tokens"] or ["max_new_tokens"]
        with pytest.raises(ValueError, match=name[0]):
            SamplingParams(**kwargs)
    assert SamplingParams(3, stop=["a"]).stop == ("a",)


@ENGINES
def test_engine_refuses_bad_setup_and_bad_prompts(engine_class: type[Engine], tok: Tokenizer) -> None:
    model = tiny(tok)
    with pytest.raises(ValueError, match="mode"):
        engine_class(model, tok, mode="static")
    with pytest.raises(ValueError, match="max_batch_size"):
        engine_class(model, tok, max_batch_size=0)

    async def go():
        engine = engine_class(model, tok)
        try:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                engine.submit([tok.vocab_size], SamplingParams(3))
        finally:
            engine.close()
        with pytest.raises(EngineError, match="closed"):
            engine.submit([5], SamplingParams(3))

    run(go())


@ENGINES
def test_unseeded_requests_differ_and_close_cancels_what_is_left(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    model = tiny(tok, cls=NoEosLM)
    model.eos_id = tok.eos_id  # never ends by itself

    async def go():
        engine = engine_class(model, tok, max_batch_size=2)
        a, b = await collect_all(engine, [([5], SamplingParams(30)), ([5], SamplingParams(30))])
        pending = [engine.submit([5], SamplingParams(100_000)) for _ in range(3)]
        await first_event(pending[0])
        engine.close()
        return a, b, [await s.collect() for s in pending]

    a, b, pending = run(go())
    assert ids_of(a[0]) != ids_of(b[0])  # a random seed per request
    assert all(fin.reason == "cancelled" for _, fin in pending)


@ENGINES
def test_a_failing_model_fails_its_requests_and_the_engine_keeps_serving(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    model = scripted(tok, byte_ids(tok, b"ok"), cls=PoisonedLM)

    async def go():
        engine = engine_class(model, tok)
        try:
            with pytest.raises(EngineError, match="device lost"):
                await engine.submit([PoisonedLM.POISON], SamplingParams(2, temperature=0.0)).collect()
            return await engine.submit([5], SamplingParams(2, temperature=0.0)).collect()
        finally:
            engine.close()

    _, fin = run(go())
    assert fin.text == "ok"


@ENGINES
def test_exact_mode_gives_bit_identical_logprobs_alone_or_batched(
    engine_class: type[Engine], tok: Tokenizer
) -> None:
    """exact=True: full-batch shapes at every step, so seeded sampling is exact, not just overwhelmingly likely."""
    model = tiny(tok)
    requests = [(tok.encode(p), dataclasses.replace(params, logprobs=2)) for p, params in MIXED]

    async def go(together: bool):
        engine = engine_class(model, tok, max_batch_size=4, exact=True)
        try:
            if together:
                return await collect_all(engine, requests)
            return [await engine.submit(ids, params).collect() for ids, params in requests]
        finally:
            engine.close()

    solo, batched = run(go(False)), run(go(True))
    for (d1, f1), (d2, f2) in zip(solo, batched):
        assert ids_of(d1) == ids_of(d2) and f1.text == f2.text
        assert [lp for d in d1 for lp in d.logprobs] == [
            lp for d in d2 for lp in d.logprobs
        ]  # floats, exactly


def test_decode_static_sends_an_empty_delta_while_text_is_held_back(tok: Tokenizer) -> None:
    model = scripted(tok, byte_ids(tok, b"xySTOxzSTOPab"))
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop=("STOP",))
    steps = list(decode_static(model, tok, [([5], params), ([5], dataclasses.replace(params, stop=()))]))
    held = [s[0] for s in steps]
    assert [d.text for d in held[:8]] == ["x", "y", "", "", "", "STOx", "z", ""]
    assert held[7].token_ids == [] and held[7].logprobs is None
    fin = next(e for e in held if isinstance(e, Finished))
    assert (fin.reason, fin.text) == ("stop", "xySTOxz")
    assert held.index(fin) == 10 and all(e is None for e in held[11:])
    assert "".join(s[1].text for s in steps if isinstance(s[1], Delta)) == "xySTOxzSTOPabxySTOxz"


def test_token_bytes_spell_out_what_the_tokenizer_decodes(tok: Tokenizer) -> None:
    text = "ROMEO: naïve café — 🙂 <|endoftext|> done\n"
    ids = tok.encode(text)
    table = token_bytes(tok)
    assert len(table) == tok.vocab_size and token_bytes(tok) is table  # built once per tokenizer
    assert b"".join(table[i] for i in ids).decode("utf-8") == text == tok.decode(ids)
    assert table[tok.eos_id] == b"<|endoftext|>"


@ENGINES
def test_ids_the_tokenizer_lacks_decode_to_nothing(engine_class: type[Engine], tok: Tokenizer) -> None:
    model = scripted(tok, [*byte_ids(tok, b"a"), tok.vocab_size + 3, *byte_ids(tok, b"b")], extra_ids=8)

    async def go():
        engine = engine_class(model, tok)
        try:
            return await engine.submit([5], SamplingParams(3, temperature=0.0, logprobs=1)).collect()
        finally:
            engine.close()

    deltas, fin = run(go())
    assert fin.text == "ab" and fin.completion_tokens == 3
    assert ids_of(deltas) == [*byte_ids(tok, b"a"), tok.vocab_size + 3, *byte_ids(tok, b"b")]


@ENGINES
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_engine_serves_a_model_at_another_precision(
    engine_class: type[Engine], tok: Tokenizer, precision: str
) -> None:
    """serve.precision's model in the engine: bf16 with exact=True gives every request its tokens alone; int8
    quantizes activations per call over the whole batch, so only lengths and reasons are compared."""
    from lm.precision import inference_model

    model = inference_model(tiny(tok), precision)
    requests = [(tok.encode(p), params) for p, params in MIXED]

    async def decode(mode: str):
        engine = engine_class(model, tok, max_batch_size=4, mode=mode, exact=True)
        try:
            if mode == "none":
                return [await engine.submit(ids, params).collect() for ids, params in requests]
            return await collect_all(engine, requests)
        finally:
            engine.close()

    solo, together = run(decode("none")), run(decode("continuous"))
    for (d1, f1), (d2, f2) in zip(solo, together):
        assert (f1.reason, f1.completion_tokens) == (f2.reason, f2.completion_tokens)
        check_consistent(d2, f2)
        if precision == "bf16":
            assert ids_of(d1) == ids_of(d2) and f1.text == f2.text
    assert solo[0][1].completion_tokens == 40  # past block_size: windowing works at this precision too


def test_a_killed_decoding_process_fails_its_requests_and_later_submits(tok: Tokenizer) -> None:
    model = scripted(tok, byte_ids(tok, b"never ending "))  # no EOS: the request runs until the child dies

    async def go():
        engine = ProcessEngine(model, tok)
        try:
            stream = engine.submit([5], SamplingParams(max_new_tokens=100_000))
            await first_event(stream)
            assert engine.alive
            engine._proc.kill()
            with pytest.raises(EngineError, match="decoding process ended"):
                await stream.collect()
            assert not engine.alive
            with pytest.raises(EngineError, match="decoding process is gone"):
                engine.submit([5], SamplingParams(max_new_tokens=2))
        finally:
            engine.close()  # after the child died: returns, nothing left

    run(go())


def test_the_decoding_process_exits_when_its_parent_is_killed(tok: Tokenizer, tmp_path) -> None:
    """A replica killed with SIGKILL leaves no decoding process behind: the child reads end-of-file."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, sys, time\n"
        "import torch\n"
        "from lmplatform.engine import ProcessEngine, SamplingParams\n"
        "from lm.config import ModelConfig\n"
        "from lm.model import TransformerLM\n"
        "from lm.tokenizer import load_tokenizer\n"
        "tok = load_tokenizer(sys.argv[1])\n"
        "cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)\n"
        "engine = ProcessEngine(TransformerLM(cfg), tok)\n"
        "async def go():\n"
        "    engine.submit([5], SamplingParams(max_new_tokens=100_000))\n"
        "    print(engine._proc.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(go())\n"
    )
    tok.save(tmp_path / "tok")
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "tok")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child)
    finally:
        parent.kill()


@ENGINES
def test_a_request_whose_event_loop_closed_frees_its_row(engine_class: type[Engine], tok: Tokenizer) -> None:
    """Nobody can read it any more: the next step's delivery fails and cancels it, in a child process too."""
    model = scripted(tok, byte_ids(tok, b"never ending "))  # no EOS: only a cancel ends it
    engine = engine_class(model, tok)
    try:

        async def go():
            await first_event(engine.submit([5], SamplingParams(max_new_tokens=100_000)))

        run(go())  # returns with the request still decoding, then closes its event loop
        deadline = time.monotonic() + 20
        while engine.stats()["running"] > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = engine.stats()
        assert stats["running"] == 0 and stats["requests_cancelled"] == 1, stats
    finally:
        engine.close()
