"""Tests for lm/generate.py: sampling edge cases, KV-cache equivalence, EOS handling, seeds, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig
from lm.generate import generate, iter_generate, sample_next
from lm.model import KVCache, TransformerLM

TINY = ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32)
INF = float("inf")


def make(seed: int = 0, **changes: object) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(dataclasses.replace(TINY, **changes))


def prompt(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits: torch.Tensor, n: int = 2000, seed: int = 0, **kwargs: object) -> torch.Tensor:
    """n samples from one row of logits (V,), as a (n,) tensor of token ids."""
    return sample_next(logits.expand(n, -1), generator=gen(seed), **kwargs)


# ------------------------------------------------------------------------------------------------------------
# sample_next


def test_greedy_and_its_equivalents_pick_the_argmax() -> None:
    logits = torch.randn(64, 50, generator=gen(0))
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), best)
    assert torch.equal(sample_next(logits, top_k=1, generator=gen(1)), best)
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=gen(2)), best)
    assert torch.equal(sample_next(logits, temperature=1e-9, generator=gen(3)), best)


def test_everything_minus_inf_but_one_token_returns_that_token() -> None:
    logits = torch.full((4, 20), -INF)
    only = torch.tensor([3, 0, 19, 7])
    logits[torch.arange(4), only] = 0.5
    for kwargs in ({}, {"temperature": 0.0}, {"top_k": 5}, {"top_p": 0.3}, {"top_k": 100, "top_p": 1.0}):
        assert torch.equal(sample_next(logits, generator=gen(0), **kwargs), only), kwargs


@pytest.mark.parametrize(
    "logits",
    [
        -1000.0 - torch.rand(8, 30, generator=gen(0)),  # all negative
        torch.tensor([[1e30, 0.0, -1e30, 1e29]]).expand(8, -1),  # huge
        torch.full((8, 30), 1e-30),  # tiny
        torch.tensor([[3.0e38, -3.0e38, 0.0, INF]]).expand(8, -1),  # extremes of float32
        torch.full((8, 30), -INF),  # nothing possible: uniform rather than a crash
    ],
    ids=["all-negative", "huge", "tiny", "float32-extremes", "all-minus-inf"],
)
@pytest.mark.parametrize("temperature", [0.0, 1e-6, 1.0, 50.0])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.5), (1000, 1.0), (2, 1e-9)])
def test_extreme_logits_never_crash(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    out = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen(0))
    assert out.shape == (8,) and out.dtype == torch.long
    assert torch.all((out >= 0) & (out < logits.size(-1)))


def test_huge_logit_dominates_and_tiny_logits_are_uniform() -> None:
    assert torch.all(draws(torch.tensor([0.0, 1e30, -1e30, 1e29])) == 1)
    assert torch.all(draws(torch.tensor([0.0, INF, 5.0])) == 1)
    counts = torch.bincount(draws(torch.full((10,), 1e-30), n=5000), minlength=10)
    assert counts.min() > 350  # 500 expected per token


def test_top_k_keeps_only_the_k_most_likely() -> None:
    logits = torch.tensor([1.0, 3.0, 0.0, 2.5, 2.0, -1.0])
    assert set(draws(logits, top_k=3).tolist()) == {1, 3, 4}
    assert set(draws(logits, top_k=2).tolist()) == {1, 3}
    # top_k above the vocabulary size changes nothing: same draws as no filter with the same seed.
    assert torch.equal(draws(logits, top_k=1000), draws(logits))


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.05, 0.3, 0.15]).log()
    assert set(draws(logits, top_p=0.45).tolist()) == {0}
    assert set(draws(logits, top_p=0.7).tolist()) == {0, 2}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(logits, top_p=0.85).tolist()) == {0, 2, 3}
    assert set(draws(logits, top_p=0.99).tolist()) == {0, 1, 2, 3}
    assert torch.equal(draws(logits, top_p=1.0), draws(logits))
    # top-k and top-p combine; the nucleus comes from the renormalised top-k (0.5, 0.3, 0.15) / 0.95:
    # before token 3 lie 0.8 of the full mass (< 0.82, kept) but 0.842 of the top-3 mass (>= 0.82, dropped).
    assert set(draws(logits, top_p=0.82).tolist()) == {0, 2, 3}
    assert set(draws(logits, top_k=3, top_p=0.82).tolist()) == {0, 2}
    assert set(draws(logits, top_k=2, top_p=0.99).tolist()) == {0, 2}


def test_sampling_follows_the_softmax_distribution() -> None:
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    freq = torch.bincount(draws(logits, n=20000), minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.125, 0.125]), atol=0.015, rtol=0)
    cold = torch.bincount(draws(logits, n=20000, temperature=0.5), minlength=4).float() / 20000
    expected = F.softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(cold, expected, atol=0.015, rtol=0)


def test_half_precision_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(16, 40, generator=gen(5))
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype)
        out = sample_next(low, top_k=10, top_p=0.9, generator=gen(6))
        assert torch.equal(out, sample_next(low.float(), top_k=10, top_p=0.9, generator=gen(6)))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
    ],
)
def test_bad_sampling_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_next(torch.zeros(1, 10), **kwargs)
    model = make()
    with pytest.raises(ValueError, match=name):
        iter_generate(model, prompt(1, 3), 5, **kwargs)  # raised at the call, before any iteration
    with pytest.raises(ValueError, match=name):
        generate(model, prompt(1, 3), 5, **kwargs)


def test_bad_generation_arguments_raise() -> None:
    model = make()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt(1, 3), -1)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------------------------------
# generate with a real model


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 50, "top_p": 0.95}])
def test_cached_generation_equals_recomputation(attention: str, sampling: dict) -> None:
    model = make(attention=attention)
    idx = prompt(2, 5)
    cached = generate(model, idx, 20, generator=gen(7), use_cache=True, **sampling)
    recomputed = generate(model, idx, 20, generator=gen(7), use_cache=False, **sampling)
    assert cached.shape == (2, 25)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, recomputed)


def reference_greedy(model: TransformerLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Plain recomputation over the last block_size tokens, written independently of lm.generate."""
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.cfg.block_size :])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len", [20, 40])  # grows past block_size=32 / starts past it
def test_generation_beyond_block_size_matches_recomputation(prompt_len: int) -> None:
    model = make()
    idx = prompt(2, prompt_len)
    expected = reference_greedy(model, idx, 30)
    for use_cache in (True, False):
        out = generate(model, idx, 30, temperature=0.0, use_cache=use_cache)
        assert out.shape == (2, prompt_len + 30)
        assert torch.equal(out, expected), use_cache
    sampled = [generate(model, idx, 30, generator=gen(3), use_cache=c, top_k=20) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_batched_rows_are_independent_of_each_other() -> None:
    model = make()
    idx = prompt(2, 6)
    both = generate(model, idx, 15, temperature=0.0)
    for row in range(2):
        assert torch.equal(both[row : row + 1], generate(model, idx[row : row + 1], 15, temperature=0.0))


def test_seeded_generation_is_reproducible() -> None:
    model = make()
    idx = prompt(2, 4)
    a = generate(model, idx, 20, generator=gen(11))
    b = generate(model, idx, 20, generator=gen(11))
    c = generate(model, idx, 20, generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 40 draws from a near-uniform distribution over 300 tokens


def test_generate_restores_training_mode_and_builds_no_graph() -> None:
    model = make().train()
    out = generate(model, prompt(1, 3), 4)
    assert model.training
    assert not out.requires_grad
    model.eval()
    generate(model, prompt(1, 3), 4)
    assert not model.training


def test_zero_new_tokens_returns_the_prompt() -> None:
    idx = prompt(2, 3)
    assert torch.equal(generate(make(), idx, 0), idx)


# ------------------------------------------------------------------------------------------------------------
# EOS handling with a scripted model


class Successor(nn.Module):
    """Stand-in LM whose next token is always last + 1 (mod V), so when each row meets EOS is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = TINY
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled) at every call

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return 10.0 * F.one_hot((idx + 1) % TINY.vocab_size, TINY.vocab_size).float()  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self._logits(idx), None

    def new_kv_cache(self, batch_size: int, device: object = None, dtype: object = None) -> KVCache:
        return KVCache(TINY.n_layer, batch_size, TINY.n_head, TINY.block_size, TINY.head_dim, device, dtype)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cache.length += idx.size(1)
        return self._logits(idx)


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_stop_at_eos_independently_and_are_padded(use_cache: bool) -> None:
    model = Successor().train()
    idx = torch.tensor([[4, 5], [0, 1]])
    out = generate(model, idx, 10, temperature=0.0, eos_id=7, pad_id=299, use_cache=use_cache)
    # Row 0 emits 6, 7 (EOS kept) then padding; row 1 needs 6 steps to reach 7, which ends the generation.
    expected = torch.tensor([[4, 5, 6, 7, 299, 299, 299, 299], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(out, expected)
    assert model.training and model.seen and all(s == (False, False) for s in model.seen)
    # Without pad_id the finished row repeats EOS.
    out = generate(model, idx, 10, temperature=0.0, eos_id=7, use_cache=use_cache)
    assert torch.equal(out[0], torch.tensor([4, 5, 6, 7, 7, 7, 7, 7]))


def test_iter_generate_streams_one_token_per_row_and_stops_when_all_finished() -> None:
    steps = list(iter_generate(Successor(), torch.tensor([[5], [3]]), 10, temperature=0.0, eos_id=7))
    assert [s.tolist() for s in steps] == [[6, 4], [7, 5], [7, 6], [7, 7]]
    no_eos = list(iter_generate(Successor(), torch.tensor([[5], [3]]), 10, temperature=0.0))
    assert len(no_eos) == 10
