"""Tests for per-row decoding (lm/model.py RowKVCache + forward_rows, lm/generate.py BatchDecoder): each row of a
batched decode equals decoding it alone, rows join and leave at any step, windowing past block_size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lm.config import ModelConfig
from lm.generate import BatchDecoder, generate
from lm.model import TransformerLM

TINY = ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy shapes: one thread is fastest


def make(seed: int = 0, **changes: object) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(dataclasses.replace(TINY, **changes)).eval()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_alone(model: TransformerLM, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits behind them, for one row decoded on its own."""
    dec = BatchDecoder(model, 1)
    handle, logits = dec.admit(prompt)
    out, seen = [], [logits]
    for _ in range(steps - 1):
        out.append(int(seen[-1].argmax()))
        seen.append(dec.step({handle: out[-1]})[0])
    out.append(int(seen[-1].argmax()))
    return out, torch.stack(seen)


def test_prefill_of_a_row_is_the_training_forward_bit_for_bit() -> None:
    model = make()
    idx = torch.tensor([tokens(20, 1)])
    cache = model.new_row_cache(3)
    with torch.no_grad():
        rows = model.forward_rows(idx, cache, rows=slice(1, 2))
        full = model(idx)[0]
    assert torch.equal(rows, full)
    assert cache.lengths == [0, 20, 0]


def test_each_row_of_a_batched_decode_equals_decoding_it_alone() -> None:
    """Rows with different prompt lengths, admitted at different steps, advance together one token a step."""
    model = make()
    prompts = {0: tokens(3, 1), 2: tokens(9, 2), 5: tokens(17, 3)}  # admission step -> prompt
    steps = 12
    dec = BatchDecoder(model, 4)
    got: dict[int, list[int]] = {}
    logits_seen: dict[int, list[torch.Tensor]] = {}
    pending: dict[int, int] = {}
    for step in range(steps + 5):
        live = [h for h in dec.live if len(got[h]) < steps]
        for h in [h for h in dec.live if h not in live]:
            dec.release(h)
            del pending[h]
        if pending:
            out = dec.step(pending)
            for h, row in zip(dec.live, out):
                logits_seen[h].append(row)
        if step in prompts:
            h, row = dec.admit(prompts[step])
            got[h], logits_seen[h] = [], [row]
        for h in dec.live:
            pending[h] = int(logits_seen[h][-1].argmax())
            got[h].append(pending[h])
    assert len(got) == 3 and all(len(v) == steps for v in got.values())
    for h, prompt in zip(sorted(got), prompts.values()):
        alone_tokens, alone_logits = decode_alone(model, prompt, steps)
        assert got[h] == alone_tokens
        torch.testing.assert_close(torch.stack(logits_seen[h]), alone_logits, rtol=1e-5, atol=1e-5)
        # ... and the same greedy tokens as lm.generate's single-sequence KV-cache path.
        ref = generate(model, torch.tensor([prompt]), steps, temperature=0.0)[0, len(prompt) :].tolist()
        assert got[h] == ref


def test_a_row_prefilled_into_a_free_slot_leaves_the_other_rows_alone() -> None:
    model = make()
    cache = model.new_row_cache(2)
    a, b = tokens(5, 1), tokens(11, 2)
    with torch.no_grad():
        model.forward_rows(torch.tensor([a]), cache, rows=slice(0, 1))
        k_before = [k[0, :, :5].clone() for k in cache.k]
        model.forward_rows(torch.tensor([b]), cache, rows=slice(1, 2))
        assert all(torch.equal(k[0, :, :5], kb) for k, kb in zip(cache.k, k_before))
        assert cache.lengths == [5, 11]
        # One step advances both rows at their own positions (5 and 11).
        two = model.forward_rows(torch.tensor([[7], [8]]), cache, last_only=True)
    assert cache.lengths == [6, 12]
    with torch.no_grad():
        alone_a = model(torch.tensor([a + [7]]))[0][0, -1]
        alone_b = model(torch.tensor([b + [8]]))[0][0, -1]
    torch.testing.assert_close(two, torch.stack([alone_a, alone_b]), rtol=1e-5, atol=1e-5)


def test_released_rows_are_reused_and_the_rest_continue_unchanged() -> None:
    model = make()
    prompts = [tokens(4, 1), tokens(7, 2), tokens(2, 3)]
    dec = BatchDecoder(model, 3)
    handles, pending = [], {}
    for p in prompts:
        h, logits = dec.admit(p)
        handles.append(h)
        pending[h] = int(logits.argmax())
    history = {h: [pending[h]] for h in handles}
    for step in range(8):
        if step == 3:  # the first row leaves; the last moves into its slot; a new row takes the free one
            dec.release(handles[0])
            del pending[handles[0]], history[handles[0]]
            assert dec.free_rows() == 1
            h, logits = dec.admit(tokens(6, 4))
            assert h == handles[0]  # the freed handle is reused
            pending[h], history[h] = int(logits.argmax()), [int(logits.argmax())]
        out = dec.step(pending)
        for h, row in zip(dec.live, out):
            pending[h] = int(row.argmax())
            history[h].append(pending[h])
    for h, prompt in ((handles[1], prompts[1]), (handles[2], prompts[2])):
        assert history[h] == decode_alone(model, prompt, 9)[0]
    assert history[handles[0]] == decode_alone(model, tokens(6, 4), 6)[0]


def test_explicit_attention_decodes_rows_like_fused() -> None:
    fused, explicit = make(), make(attention="explicit")
    explicit.load_state_dict(fused.state_dict())
    for prompt in (tokens(3, 1), tokens(10, 2)):
        assert decode_alone(explicit, prompt, 10)[0] == decode_alone(fused, prompt, 10)[0]
    dec_f, dec_e = BatchDecoder(fused, 2), BatchDecoder(explicit, 2)
    for dec in (dec_f, dec_e):
        dec.admit(tokens(3, 1))
        dec.admit(tokens(10, 2))
    torch.testing.assert_close(dec_e.step({0: 5, 1: 6}), dec_f.step({0: 5, 1: 6}), rtol=1e-5, atol=1e-5)


def test_forward_rows_refuses_to_run_past_block_size() -> None:
    model = make()
    cache = model.new_row_cache(1)
    with torch.no_grad():
        model.forward_rows(torch.tensor([tokens(32, 1)]), cache)
        with pytest.raises(ValueError, match="block_size=32"):
            model.forward_rows(torch.tensor([[3]]), cache)
        with pytest.raises(ValueError, match="2 rows"):
            model.forward_rows(torch.tensor([[3], [4]]), cache, rows=slice(0, 1))


def test_batch_decoder_refuses_misuse() -> None:
    dec = BatchDecoder(make(), 1)
    with pytest.raises(ValueError, match="at least one token"):
        dec.admit([])
    h, _ = dec.admit([5])
    with pytest.raises(RuntimeError, match="all 1 rows"):
        dec.admit([6])
    with pytest.raises(ValueError, match="live rows"):
        dec.step({h: 1, h + 1: 2})
    with pytest.raises(ValueError, match="max_rows"):
        BatchDecoder(make(), 0)


def test_generation_continues_past_block_size_with_bounded_work() -> None:
    """Windowing: a full row keeps its last block_size/2 - 1 tokens; work per token stays bounded."""
    model = make()
    block, steps, prompt = TINY.block_size, 200, tokens(10, 1)
    dec = BatchDecoder(model, 2)
    h, logits = dec.admit(prompt)
    h2, logits2 = dec.admit(tokens(30, 2))  # a second row that windows at other steps
    context = list(prompt)
    for _ in range(steps):
        token, token2 = int(logits.argmax()), int(logits2.argmax())
        refreshing = len(context) >= block
        out = dec.step({h: token, h2: token2})
        logits, logits2 = out[0], out[1]
        if refreshing:  # the scheme: last block/2 - 1 tokens at positions 0.., then the new token
            context = context[-(block // 2 - 1) :]
        context.append(token)
        if refreshing:
            with torch.no_grad():
                expected = model(torch.tensor([context]))[0][0, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert dec.decode_tokens == 2 * steps  # one token per row per step
    keep = block // 2 - 1
    per_row_windows = -(-(steps + 30) // (block - keep))  # a refresh at most every block - keep steps
    assert dec.windowed <= 2 * per_row_windows
    # Prefill work: the two prompts plus keep tokens per refresh: about one token per generated token,
    # far below recomputing a whole window (block tokens) for every token.
    assert dec.prefill_tokens <= 10 + 30 + dec.windowed * keep
    assert dec.prefill_tokens < 1.1 * dec.decode_tokens
    assert dec.forward_calls <= 2 + steps + dec.windowed


def test_fixed_shape_rows_are_bit_identical_alone_or_batched() -> None:
    model = make()
    prompts = [tokens(3, 1), tokens(9, 2), tokens(20, 3)]

    def run(which: list[int]) -> dict[int, torch.Tensor]:
        dec = BatchDecoder(model, 4, fixed_shape=True)
        handles = {dec.admit(prompts[i])[0]: i for i in which}
        seen = {i: [] for i in which}
        for step in range(15):  # past block_size for the longest prompt
            out = dec.step({h: (7 * step + handles[h]) % 300 for h in dec.live})
            for h, row in zip(dec.live, out):
                seen[handles[h]].append(row)
        return {i: torch.stack(v) for i, v in seen.items()}

    together = run([0, 1, 2])
    for i in range(3):
        assert torch.equal(run([i])[i], together[i])


def test_rows_prefilled_together_with_padding_equal_each_alone() -> None:
    model = make()
    prompts = [tokens(3, 1), tokens(17, 2), tokens(8, 3)]
    dec = BatchDecoder(model, 4)
    dec.admit(tokens(5, 4))  # a row already decoding keeps its state
    handles, logits = dec.admit_many(prompts)
    assert dec.cache.lengths[:4] == [5, 3, 17, 8]  # the padding is not counted
    assert dec.prefill_tokens == 5 + 3 + 17 + 8 and dec.forward_calls == 2
    pending = {h: int(row.argmax()) for h, row in zip(handles, logits)}
    got = {h: [t] for h, t in pending.items()}
    pending[0] = 1
    for _ in range(9):
        out = dec.step(pending)
        for h, row in zip(dec.live, out):
            pending[h] = int(row.argmax())
            if h in got:
                got[h].append(pending[h])
    for h, prompt, first in zip(handles, prompts, logits):
        alone_tokens, alone_logits = decode_alone(model, prompt, 10)
        assert got[h] == alone_tokens
        torch.testing.assert_close(first, alone_logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        model.forward_rows(torch.tensor([[1, 2]]), model.new_row_cache(1), lengths=[3])


def test_an_empty_decoder_steps_and_admits_nothing() -> None:
    for fixed in (False, True):
        dec = BatchDecoder(make(), 2, fixed_shape=fixed)
        assert dec.step({}).shape == (0, TINY.vocab_size)
        handles, logits = dec.admit_many([])
        assert handles == [] and logits.shape == (0, TINY.vocab_size)
        with pytest.raises(RuntimeError, match="free rows"):
            dec.admit_many([[1], [2], [3]])
