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
    probs = _filtered(x, temperature, top_k, top_p).softmax(dim=-1)  # the 0-logit token survives: sums to 1
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def filter_logits(
    logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """float32 logits (B, V) divided by temperature (> 0), with what top-k and top-p drop set to -inf: the
    distribution ``sample_next`` draws from, as logits (row maximum 0, so softmax is safe)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        raise ValueError("filter_logits needs temperature > 0; temperature 0 is greedy (argmax)")
    return _filtered(_stable_logits(logits), temperature, top_k, top_p)


def _filtered(x: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
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
    return x


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


class BatchDecoder:
    """Decode up to ``max_rows`` sequences together, each at its own position; rows join and leave at any step.

    Rows are handles (ints) that stay valid until ``release``; inside, live rows are kept contiguous in a
    ``RowKVCache`` (a released row's slot takes the last live row), so a step is one forward over a view.
    Past block_size (windowing): when a row's cache is full, its last ``block_size // 2 - 1`` tokens are
    re-prefilled at positions 0.. and the new token follows them, so the model always sees at least
    block_size / 2 tokens and at most block_size; the re-prefill (about block_size / 2 tokens once every
    block_size / 2 steps) costs about one extra token per generated token, never a whole window per token.
    The model should be in eval mode (dropout would make rows random); forwards run under inference_mode.
    ``fixed_shape``: every step runs all max_rows rows over block_size keys (idle rows masked), so a row's
    logits are bit-identical whatever else is in the batch, at the cost of full-batch work at every step.
    """

    def __init__(
        self,
        model: TransformerLM,
        max_rows: int,
        device: torch.device | str | None = None,
        fixed_shape: bool = False,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows!r} is not allowed: must be >= 1")
        self.model = model
        self.max_rows = max_rows
        self.block_size = model.cfg.block_size
        self.device = model.tok_emb.weight.device if device is None else torch.device(device)
        self.cache = model.new_row_cache(max_rows, device=self.device)
        self.fixed_shape = fixed_shape
        self._order: list[int] = []  # handle of each live row, in cache-row order
        self._context: dict[int, list[int]] = {}  # handle -> the tokens in its cache (<= block_size)
        self._free = list(range(max_rows - 1, -1, -1))  # unused handles, smallest last (popped first)
        self.forward_calls = 0
        self.prefill_tokens = 0  # tokens run through the model outside one-token decode steps
        self.decode_tokens = 0
        self.windowed = 0  # how many times a full row was re-prefilled from its last tokens

    @property
    def live(self) -> list[int]:
        """Handles of the live rows, in the order ``step`` returns their logits."""
        return list(self._order)

    def free_rows(self) -> int:
        """How many more rows ``admit`` can take."""
        return self.max_rows - len(self._order)

    def admit(self, prompt: list[int]) -> tuple[int, Tensor]:
        """Prefill a new row with ``prompt`` (its last block_size tokens); return its handle and the logits
        (V,) of the token after it. Other rows keep their state."""
        if not self._free:
            raise RuntimeError(f"all {self.max_rows} rows are in use; release one first")
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        handle = self._free.pop()
        row = len(self._order)
        self._order.append(handle)
        self._context[handle] = list(prompt[-self.block_size :])
        logits = self._prefill(row, self._context[handle], last=True)
        return handle, logits[0]

    def admit_many(self, prompts: list[list[int]]) -> tuple[list[int], Tensor]:
        """``admit`` several prompts: one right-padded prefill forward (one per prompt with fixed_shape, whose
        prefills keep one shape); return their handles and next-token logits (k, V)."""
        if len(prompts) > len(self._free):
            raise RuntimeError(f"{len(prompts)} prompts for {len(self._free)} free rows; release some first")
        if not all(prompts):
            raise ValueError("a prompt needs at least one token")
        if self.fixed_shape or len(prompts) <= 1:
            admitted = [self.admit(p) for p in prompts]
            logits = [lg.unsqueeze(0) for _, lg in admitted]
            return [h for h, _ in admitted], torch.cat(logits) if logits else self._no_logits()
        contexts = [list(p[-self.block_size :]) for p in prompts]
        first = len(self._order)
        handles = [self._free.pop() for _ in contexts]
        for handle, context in zip(handles, contexts):
            self._order.append(handle)
            self._context[handle] = context
        width = max(len(c) for c in contexts)
        idx = torch.tensor([c + [0] * (width - len(c)) for c in contexts], device=self.device)  # (k, width)
        rows = slice(first, first + len(contexts))
        for row in range(rows.start, rows.stop):
            self.cache.reset(row)
        self.forward_calls += 1
        self.prefill_tokens += sum(len(c) for c in contexts)
        with torch.inference_mode():
            logits = self.model.forward_rows(
                idx, self.cache, rows, last_only=True, lengths=[len(c) for c in contexts]
            )
        return handles, logits

    def step(self, tokens: dict[int, int]) -> Tensor:
        """Feed one token to every live row (``tokens``: handle -> token id); return the next-token logits
        (n, V) in the order of ``live``."""
        if set(tokens) != set(self._order):
            raise ValueError(f"step needs a token for exactly the live rows {sorted(self._order)}")
        for row, handle in enumerate(self._order):
            context = self._context[handle]
            if len(context) >= self.block_size:  # full: keep the last tokens at positions 0.. (see class doc)
                keep = max(self.block_size // 2 - 1, 0)
                del context[: len(context) - keep]
                self.windowed += 1
                self.cache.reset(row)
                if keep:
                    self._prefill(row, context, last=True)
            context.append(tokens[handle])
        n = len(self._order)
        if n == 0:
            return self._no_logits()
        ids = [tokens[h] for h in self._order]
        self.forward_calls += 1
        self.decode_tokens += n
        if not self.fixed_shape:
            idx = torch.tensor(ids, device=self.device).unsqueeze(1)  # (n, 1)
            with torch.inference_mode():
                return self.model.forward_rows(idx, self.cache, slice(0, n), last_only=True)  # (n, V)
        # Idle rows decode a dummy token at position 0 and are emptied again: same shapes at every step.
        idx = torch.tensor(ids + [0] * (self.max_rows - n), device=self.device).unsqueeze(1)  # (max_rows, 1)
        with torch.inference_mode():
            out = self.model.forward_rows(idx, self.cache, last_only=True, keys=self.block_size)
        for row in range(n, self.max_rows):
            self.cache.reset(row)
        return out[:n]

    def release(self, handle: int) -> None:
        """Free ``handle``'s row for a later ``admit``."""
        row = self._order.index(handle)
        last = len(self._order) - 1
        if row != last:  # keep live rows contiguous: the last one moves into the gap
            self.cache.move(last, row)
            self._order[row] = self._order[last]
        self._order.pop()
        self.cache.reset(last)
        del self._context[handle]
        self._free.append(handle)

    def _no_logits(self) -> Tensor:
        return torch.empty(0, self.model.cfg.vocab_size, device=self.device)

    def _prefill(self, row: int, tokens: list[int], last: bool) -> Tensor:
        self.cache.reset(row)
        idx = torch.tensor(tokens, device=self.device).unsqueeze(0)  # (1, T)
        self.forward_calls += 1
        self.prefill_tokens += len(tokens)
        with torch.inference_mode():
            return self.model.forward_rows(idx, self.cache, slice(row, row + 1), last_only=last)


if __name__ == "__main__":  # python -m lm.generate: `lm generate` (the CLI lives in lm.__main__)
    from lm.__main__ import run_module

    raise SystemExit(run_module("generate"))
