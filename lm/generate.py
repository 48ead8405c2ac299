"""Autoregressive sampling from a TransformerLM: temperature, top-k, top-p (nucleus), EOS stop, KV cache.

Every random draw goes through an optional ``torch.Generator``, so a seed fixes the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from lm.model import TransformerLM


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature={temperature!r} is not allowed: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r} is not allowed: must be >= 1 (or None for no top-k filter)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is not allowed: must be in (0, 1] (or None for no nucleus filter)")


def _stable_logits(logits: Tensor) -> Tensor:
    """float32 logits with the row maximum at 0: softmax can then neither overflow nor divide by zero."""
    x = torch.nan_to_num(
        logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf")
    )
    x = x - x.amax(dim=-1, keepdim=True)  # (B, V); huge logits (1e30) become 0 and finite differences
    return torch.nan_to_num(x, nan=0.0)  # a row without any finite logit (-inf - -inf) becomes uniform


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits (B, V) -> (B,). temperature 0 is greedy; top-k and top-p combine
    (top-p keeps the smallest set of most likely tokens whose probability reaches top_p, at least one)."""
    _check_sampling(temperature, top_k, top_p)
    x = _stable_logits(logits)  # (B, V), max 0
    if temperature == 0.0:
        return x.argmax(dim=-1)
    x = x / temperature  # the maximum stays 0, so no overflow even for tiny temperatures
    V = x.size(-1)
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = x.softmax(dim=-1).sort(dim=-1, descending=True)  # (B, V) each
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # the top token has mass_before 0 < top_p: always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(dim=-1)  # the 0-logit token survives every filter, so each row sums to 1
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _inference(model: TransformerLM) -> Iterator[None]:
    """eval() and no_grad for one step, then the caller's training mode back (also between yielded steps).

    A model already in eval mode is left alone: toggling walks every module, 0.3 ms a step at n_layer 6.
    """
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def iter_generate(
    model: TransformerLM,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    pad_id: int | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row (B,) for each step after prompt idx (B, T0), up to max_new_tokens.

    A row that has produced ``eos_id`` yields ``pad_id`` (``eos_id`` if None) afterwards; the iteration stops
    once every row has. The model sees at most its last block_size tokens: a longer prompt is cropped, and once
    the context outgrows block_size the KV cache is dropped and each step recomputes over the last block_size
    tokens, exactly what ``use_cache=False`` does, so both give the same tokens.
    """
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: must be >= 0")
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(
            f"prompt must be a (batch, length >= 1) tensor of token ids, got shape {tuple(idx.shape)}"
        )
    fill = pad_id if pad_id is not None else eos_id
    # A generator function would check its arguments only at the first next(); this one checks them now.
    return _steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, fill, generator, use_cache)


def _steps(
    model: TransformerLM,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    fill: int | None,
    generator: torch.Generator | None,
    use_cache: bool,
) -> Iterator[Tensor]:
    block_size = model.cfg.block_size
    B = idx.size(0)
    context = idx[:, -block_size:]  # (B, <= block_size): all the model can see
    cache = model.new_kv_cache(B, device=idx.device) if use_cache else None
    new = context  # tokens not yet in the cache: the whole prompt first (prefill), then one at a time
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with _inference(model):
            if cache is not None and cache.length + new.size(1) <= block_size:
                logits = model.forward_cached(new, cache)[:, -1, :]  # (B, V)
            else:
                cache = None  # positions would shift: recompute over the window from now on
                logits = model(context)[0][:, -1, :]  # (B, V)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(finished, fill)
            finished |= token == eos_id
        yield token
        if eos_id is not None and bool(finished.all()):
            return
        new = token.unsqueeze(1)  # (B, 1)
        context = torch.cat([context, new], dim=1)[:, -block_size:]


def generate(
    model: TransformerLM,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    pad_id: int | None = None,
) -> Tensor:
    """Prompt idx (B, T0) followed by the generated tokens: (B, T0 + n), n <= max_new_tokens the steps taken.

    A row stops at its first ``eos_id`` (kept in the output); its later positions hold ``pad_id`` (or ``eos_id``).
    """
    steps = list(
        iter_generate(
            model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache, pad_id
        )
    )
    if not steps:
        return idx.clone()
    return torch.cat([idx, torch.stack(steps, dim=1)], dim=1)  # (B, T0) + (B, n) -> (B, T0 + n)


if __name__ == "__main__":  # python -m lm.generate: `lm generate` (the CLI lives in lm.__main__)
    from lm.__main__ import run_module

    raise SystemExit(run_module("generate"))
