"""A decoder-only transformer language model in one file (after nanoGPT's model.py).

Token embedding (scaled by sqrt(n_embd)) + fixed sinusoidal positions -> n_layer pre-LayerNorm blocks
(causal multi-head self-attention, GELU MLP) -> final LayerNorm -> output projection tied to the embedding.
Shapes: B batch, T sequence length, C = n_embd, V = vocab_size, S = keys attended (cache length + T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lm.config import ModelConfig


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sin/cos position table of Vaswani et al. (2017); a buffer, so nothing to learn or to save."""

    def __init__(self, n_embd: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
        inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
        table = torch.zeros(max_len, n_embd)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: n_embd // 2])  # odd n_embd has one cos column fewer
        # Non-persistent: rebuilt from the config, so checkpoints hold only what training changed.
        self.register_buffer("table", table, persistent=False)

    def forward(self, T: int, offset: int = 0) -> Tensor:
        """Encodings of positions offset .. offset + T - 1: (T, C), a view of the table."""
        if offset < 0 or offset + T > self.table.size(0):
            raise ValueError(f"positions {offset}..{offset + T - 1} are outside 0..{self.table.size(0) - 1}")
        return self.table[offset : offset + T]


class KVCache:
    """Keys and values of every layer, preallocated to block_size, for incremental decoding.

    ``update`` writes a layer's new keys/values after the ``length`` already cached; ``TransformerLM.forward_cached``
    advances ``length`` once every layer has been updated.
    """

    def __init__(
        self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, device, dtype
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_head, T, head_dim) of ``layer``; return all its keys and values (B, n_head, S, head_dim)."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RowKVCache:
    """A batched KV cache whose rows hold sequences of their own lengths, for continuous batching.

    Row r holds ``lengths[r]`` valid entries (positions 0 .. lengths[r] - 1); entries past them are stale and
    masked out. ``TransformerLM.forward_rows`` advances a contiguous range of rows, each at its own position.
    """

    def __init__(
        self, n_layer: int, n_rows: int, n_head: int, max_len: int, head_dim: int, device, dtype
    ) -> None:
        shape = (n_rows, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.n_rows = n_rows
        self.max_len = max_len
        self.lengths = [0] * n_rows  # a Python list: masks and positions are built without a device sync

    def reset(self, row: int) -> None:
        """Empty ``row`` (its stale entries stay, masked), ready for a new prefill."""
        self.lengths[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src``'s valid entries and length into row ``dst`` (keeps live rows contiguous)."""
        n = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def update(
        self, layer: int, rows: slice, starts: list[int], k: Tensor, v: Tensor, keys: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store k, v (n, n_head, T, head_dim) of ``layer`` after each row's ``starts``; return the rows' first
        ``keys`` keys and values (n, n_head, S, head_dim), by default S = max(starts) + T (entries past a row's
        own end are stale)."""
        T = k.size(2)
        S = max(starts) + T if keys is None else keys
        ck, cv = self.k[layer][rows], self.v[layer][rows]  # views of the rows' slots
        if min(starts) == max(starts):  # every row at the same position: one slice assignment
            ck[:, :, starts[0] : starts[0] + T] = k
            cv[:, :, starts[0] : starts[0] + T] = v
        else:  # (n, 1) rows x (n, T) positions pick (n, T, n_head, head_dim) entries
            pos = torch.tensor(starts, device=k.device).unsqueeze(1) + torch.arange(T, device=k.device)
            row = torch.arange(k.size(0), device=k.device).unsqueeze(1)
            ck[row, :, pos] = k.transpose(1, 2)
            cv[row, :, pos] = v.transpose(1, 2)
        return ck[:, :, :S], cv[:, :, :S]


# Rows of the output projection per chunk of LinearCrossEntropy: about 2**20 logits (4 MiB in fp32) stay in a CPU's
# cache between the matmul, the softmax and the two gradient matmuls; a GPU wants them all at once.
_CE_CHUNK_LOGITS = {"cpu": 2**20}
_CE_CHUNK_LOGITS_OTHER = 2**28


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` without keeping the (N, V) logits.

    Equal to ``F.cross_entropy(h @ weight.T, targets, ignore_index=-100)`` up to float rounding. The loss is the
    last op of training, so its gradient with respect to the logits, softmax - one_hot, is known in forward: each
    chunk of rows is projected, normalised and turned into its gradient in place while it is still in cache, and
    only the (N, C) and (V, C) gradients are kept for backward. On this 2-core CPU a tiny training step takes
    135-136 ms instead of 170-174 ms with logits and F.cross_entropy (README "Benchmarks").
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:  # type: ignore[override]
        """h (N, C), weight (V, C), targets (N,) -> scalar mean loss; the gradients are computed on the way."""
        N, V = h.size(0), weight.size(0)
        want_h, want_w = ctx.needs_input_grad[:2]
        # Under autocast the matmuls run in its dtype, as nn.Linear would; the softmax in float32, as F.cross_entropy.
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            hd, wd = h.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)  # any class for ignored rows: their weight below is 0
            n_valid = valid.sum()
            row_weight = valid / n_valid  # d(mean loss)/d(row loss): 1/n or 0
            loss = torch.zeros((), device=h.device, dtype=torch.float32)
            grad_h = torch.empty(N, h.size(1), device=h.device, dtype=dtype) if want_h else None
            grad_w = torch.zeros(V, h.size(1), device=h.device, dtype=torch.float32) if want_w else None
            chunk = max(1, _CE_CHUNK_LOGITS.get(device, _CE_CHUNK_LOGITS_OTHER) // V)
            # One buffer for every chunk's logits, softmax and gradient, all in place: a fresh (chunk, V) tensor
            # per chunk (new pages from the allocator every time) cost more than the softmax itself.
            buf = torch.empty(min(chunk, N), V, device=h.device, dtype=torch.float32)
            for s in range(0, N, chunk):
                hc, tc = hd[s : s + chunk], safe[s : s + chunk]
                p = buf[: hc.size(0)]
                if dtype == torch.float32:
                    torch.mm(hc, wd.t(), out=p)  # (n, V) logits
                else:
                    p.copy_(hc @ wd.t())
                # Softmax in place (as F.softmax: minus the row max, exp, over the sum): one exp per logit. The
                # loss needs only the targets' probabilities, -log p. Where p underflows (a row loss past ~87 nats,
                # never seen in training) that row's loss is capped there; its gradient is exact all the same.
                p.sub_(p.amax(1, keepdim=True)).exp_()
                p.div_(p.sum(1, keepdim=True))
                rows = torch.arange(p.size(0), device=p.device)
                p_target = p[rows, tc].clamp_min(torch.finfo(p.dtype).tiny)
                loss -= (p_target.log() * row_weight[s : s + chunk]).sum()
                if not (want_h or want_w):
                    continue
                p[rows, tc] -= 1.0  # - one_hot(targets)
                g = p.mul_(row_weight[s : s + chunk].unsqueeze(1)).to(dtype)  # (n, V): d loss / d logits
                if want_h:
                    torch.mm(g, wd, out=grad_h[s : s + chunk])  # (n, V) @ (V, C)
                if want_w and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)  # (V, n) @ (n, C), accumulated in place
                elif want_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Scale the gradients found in forward by the loss's own gradient (1 unless the loss was scaled)."""
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_loss).to(h_dtype),
            None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
            None,
            None,
        )


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: fused SDPA kernel, or an explicit masked softmax that can return weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.explicit = cfg.attention == "explicit"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if self.explicit:
            mask = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()  # True = may attend
            self.register_buffer("mask", mask, persistent=False)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend causally over x (B, T, C) and the cached keys; return (B, T, C) and weights (B, n_head, T, S)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, T, C) -> (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        start = 0  # absolute position of the first query
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, n_head, S, head_dim), S = start + T
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            if not self.explicit:
                raise ValueError("need_weights=True needs model.attention='explicit'")
            y, weights = self._explicit(q, k, v, start, dropout_p)
        elif self.explicit:
            y, _ = self._explicit(q, k, v, start, dropout_p)
        else:
            y = self._fused(q, k, v, start, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, n_head, T, head_dim) -> (B, T, C), a view after SDPA
        return self.resid_dropout(self.c_proj(y)), weights

    def forward_rows(
        self, x: Tensor, cache: RowKVCache, layer: int, rows: slice, starts: list[int], mask: Tensor | None
    ) -> Tensor:
        """x (n, T, C) of rows that start at their own ``starts``; ``mask`` (n, 1, T, S) True = may attend,
        or None when causal attention from position 0 (a prefill) or no mask (one token, equal starts) is right."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (n, T, 3C) -> 3 x (n, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (n, T, C) -> (n, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        keys = None if mask is None else mask.size(-1)  # a mask spans S keys; without one, just enough
        k, v = cache.update(layer, rows, starts, k, v, keys)  # (n, n_head, S, head_dim)
        causal = mask is None and T > 1
        if self.explicit:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (n, n_head, T, S)
            if causal:
                mask = self.mask[:T, : k.size(2)]
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (n, n_head, T, head_dim) -> (n, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, start: int, dropout_p: float) -> Tensor:
        T, S = q.size(2), k.size(2)
        if start == 0:  # no cache: the kernel's own (top-left aligned) causal mask is the right one
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if T == 1:  # one new token sees every earlier key: no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # Several new queries after a cache: query i sits at position start + i and sees keys 0 .. start + i.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, start: int, p: float) -> tuple[Tensor, Tensor]:
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, n_head, T, S)
        # Rows of the mask are absolute query positions: after a cache, query i sits at start + i.
        att = att.masked_fill(~self.mask[start : start + T, :S], float("-inf"))
        weights = att.softmax(dim=-1)
        att = F.dropout(weights, p, training=True) if p > 0 else weights
        return att @ v, weights  # (B, n_head, T, S) @ (B, n_head, S, head_dim) -> (B, n_head, T, head_dim)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear -> dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, mlp_hidden) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = MultiHeadAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """(B, T, C) -> (B, T, C); with a cache, x holds only the new positions."""
        x = x + self.attn(self.ln_1(x), cache, layer)[0]
        return x + self.mlp(self.ln_2(x))

    def forward_rows(
        self, x: Tensor, cache: RowKVCache, layer: int, rows: slice, starts: list[int], mask: Tensor | None
    ) -> Tensor:
        """Like ``forward`` for rows of a RowKVCache, each at its own position (see MultiHeadAttention)."""
        x = x + self.attn.forward_rows(self.ln_1(x), cache, layer, rows, starts, mask)
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    """GPT-style decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # Vaswani et al. scale embeddings by sqrt(n_embd) so that, at std 0.02, they are not drowned by the
        # unit-amplitude sinusoidal positions added to them.
        self.emb_scale = math.sqrt(cfg.n_embd)
        self.pos_enc = SinusoidalPositionalEncoding(cfg.n_embd, cfg.block_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # one Parameter, two uses (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection is scaled down so the residual stream's variance
        # does not grow with depth (2 residual additions per layer).
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters, a tied weight counted once; ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared Parameter once
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def _embed(self, idx: Tensor, offset: int) -> Tensor:
        T = idx.size(1)
        if offset + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {offset + T} tokens is longer than model.block_size={self.cfg.block_size}; "
                "crop the input to the last block_size tokens"
            )
        pos = self.pos_enc(T, offset)  # (T, C), a slice of the precomputed table
        x = torch.add(pos, self.tok_emb(idx), alpha=self.emb_scale)  # pos + scale * emb: (B, T, C) in one op
        return self.drop(x)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, need_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T), already the next tokens, also the mean
        cross-entropy (positions with target -100 ignored). ``need_logits=False`` with targets returns
        (None, loss) through LinearCrossEntropy, which never holds the logits: the training step's path."""
        x = self._embed(idx, 0)  # (B, T, C)
        checkpointing = self.cfg.gradient_checkpointing and self.training
        for block in self.blocks:
            # Checkpointing trades compute for memory: activations inside a block are recomputed in backward.
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        x = self.ln_f(x)
        if targets is not None and not need_logits:
            h = x.view(-1, x.size(-1))  # (B*T, C)
            return None, LinearCrossEntropy.apply(h, self.lm_head.weight, targets.reshape(-1), -100)
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_kv_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for ``forward_cached`` on the model's device and dtype unless given."""
        weight = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layer,
            batch_size,
            self.cfg.n_head,
            self.cfg.block_size,
            self.cfg.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )

    def forward_cached(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, t, V) of new tokens idx (B, t) that follow the ``cache.length`` tokens already cached;
        appends their keys and values. Prefill with the whole prompt, then feed one token at a time."""
        B, t = idx.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's batch_size={cache.batch_size}")
        if t < 1:
            raise ValueError("forward_cached needs at least one new token")
        x = self._embed(idx, cache.length)  # raises if cache.length + t > block_size
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        cache.length += t
        return self.lm_head(self.ln_f(x))  # (B, t, C) -> (B, t, V)

    def new_row_cache(
        self, n_rows: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RowKVCache:
        """An empty per-row cache of ``n_rows`` rows for ``forward_rows``, on the model's device and dtype."""
        w, c = self.tok_emb.weight, self.cfg
        device, dtype = w.device if device is None else device, w.dtype if dtype is None else dtype
        return RowKVCache(c.n_layer, n_rows, c.n_head, c.block_size, c.head_dim, device, dtype)

    def forward_rows(
        self,
        idx: Tensor,
        cache: RowKVCache,
        rows: slice | None = None,
        last_only: bool = False,
        keys: int | None = None,
        lengths: list[int] | None = None,
    ) -> Tensor:
        """Logits (n, T, V) (or (n, V) with ``last_only``) of new tokens idx (n, T) for cache rows ``rows``
        (default the first n), each following its own ``cache.lengths[r]`` tokens; appends their keys/values.

        A row sees only its own entries, at its own positions, so it decodes as it would alone (up to float
        rounding that depends on the shapes). Reset a row and pass its prompt to prefill it while other rows keep
        their state. ``keys`` fixes how many cache slots attention spans (masked), for shape-stable results.
        ``lengths``: row i holds only its first lengths[i] tokens (right padding after them, never seen by
        them): its cache grows by that much, and ``last_only`` takes its logits at its own last token.
        """
        n, T = idx.shape
        rows = slice(0, n) if rows is None else rows
        starts = cache.lengths[rows]
        if len(starts) != n:
            raise ValueError(f"{n} rows of tokens for cache rows {rows.start}..{rows.stop - 1}")
        if T < 1:
            raise ValueError("forward_rows needs at least one new token per row")
        if lengths is not None and (len(lengths) != n or not all(1 <= m <= T for m in lengths)):
            raise ValueError(f"lengths={lengths} must hold {n} numbers in 1..{T}")
        S = max(starts) + T
        if keys is not None:
            if not S <= keys <= self.cfg.block_size:
                raise ValueError(
                    f"keys={keys} must be in {S}..{self.cfg.block_size} (the rows' extent .. block_size)"
                )
            S = keys
        if S > self.cfg.block_size:
            raise ValueError(
                f"a row would hold {S} tokens, more than model.block_size={self.cfg.block_size}; "
                "window it first (see lm.generate.BatchDecoder)"
            )
        device = idx.device
        pos = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(T, device=device)  # (n, T)
        x = torch.add(self.pos_enc.table[pos], self.tok_emb(idx), alpha=self.emb_scale)  # as in _embed
        x = self.drop(x)
        # No mask for a prefill from position 0 (plain causal attention, the training path's own kernel) or
        # for one token per row at a common position (it sees every cached key); else query at p sees 0 .. p.
        mask = None
        if keys is not None or (max(starts) > 0 and (T > 1 or min(starts) != max(starts))):
            mask = (torch.arange(S, device=device) <= pos.unsqueeze(-1)).unsqueeze(1)  # (n, 1, T, S)
        for layer, block in enumerate(self.blocks):
            x = block.forward_rows(x, cache, layer, rows, starts, mask)
        grown = [T] * n if lengths is None else lengths
        for r, m in zip(range(*rows.indices(cache.n_rows)), grown):
            cache.lengths[r] += m  # past a row's length: padding, stale like any entry past its end
        if last_only and lengths is not None:
            x = x[torch.arange(n, device=device), torch.tensor(lengths, device=device) - 1]  # (n, C)
        elif last_only:
            x = x[:, -1, :]  # (n, C): the projection to V only where a token is sampled
        return self.lm_head(self.ln_f(x))  # (n, T, V) or (n, V)
