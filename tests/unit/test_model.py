"""Tests for lm/model.py: shapes, loss, causality, both attention paths, tying, counts, init, checkpointing, cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import lm.model
from lm.config import ModelConfig
from lm.model import MultiHeadAttention, SinusoidalPositionalEncoding, TransformerLM

TINY = ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32)
ATTENTIONS = ("fused", "explicit")


def make(seed: int = 0, **changes: object) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(dataclasses.replace(TINY, **changes)).eval()


def tokens(B: int, T: int, seed: int = 1, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_initial_loss_near_uniform() -> None:
    model = make()
    idx, targets = tokens(3, 20), tokens(3, 20, seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, TINY.vocab_size)
    assert loss is not None and loss.shape == ()
    # Small init -> nearly uniform predictions -> cross-entropy close to ln(V).
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1
    logits_only, no_loss = model(idx)
    assert no_loss is None
    torch.testing.assert_close(logits_only, logits)


def test_loss_is_mean_cross_entropy_over_targets_not_minus_100() -> None:
    model = make()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    targets[0, :5] = -100
    targets[1, 10:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])  # targets are the next tokens: no shift
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_future_tokens_never_change_past_logits(attention: str) -> None:
    model = make(attention=attention)
    idx = tokens(2, 24)
    base, _ = model(idx)
    for t in (0, 7, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(24 - t - 1)) % TINY.vocab_size
        out, _ = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-4)  # the change is visible later


def test_fused_and_explicit_attention_agree() -> None:
    fused = make(attention="fused")
    explicit = TransformerLM(dataclasses.replace(TINY, attention="explicit")).eval()
    explicit.load_state_dict(fused.state_dict())  # the mask is a non-persistent buffer: strict load works
    idx, targets = tokens(3, 32), tokens(3, 32, seed=5)
    (a, loss_a), (b, loss_b) = fused(idx, targets), explicit(idx, targets)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)


def test_explicit_attention_returns_causal_weights_that_sum_to_one() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(dataclasses.replace(TINY, attention="explicit")).eval()
    x = torch.randn(2, 10, TINY.n_embd)
    y, weights = attn(x, need_weights=True)
    assert weights is not None and weights.shape == (2, TINY.n_head, 10, 10)
    assert torch.all(weights.triu(diagonal=1) == 0)
    lower = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.all(weights[..., lower] > 0)  # every past position gets some weight
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, TINY.n_head, 10))
    y_plain, no_weights = attn(x)
    assert no_weights is None
    torch.testing.assert_close(y, y_plain)


def test_need_weights_on_fused_attention_is_an_error() -> None:
    attn = MultiHeadAttention(TINY)
    with pytest.raises(ValueError, match="explicit"):
        attn(torch.randn(1, 4, TINY.n_embd), need_weights=True)


def test_weight_tying_shares_one_parameter_and_sums_both_gradients() -> None:
    tied = make()
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = make(tie_weights=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.tok_emb.weight.detach().clone()})
    idx, targets = tokens(2, 12), tokens(2, 12, seed=3)
    tied(idx, targets)[1].backward()
    untied(idx, targets)[1].backward()
    both = untied.tok_emb.weight.grad + untied.lm_head.weight.grad
    assert untied.tok_emb.weight.grad.abs().sum() > 0 and untied.lm_head.weight.grad.abs().sum() > 0
    torch.testing.assert_close(tied.tok_emb.weight.grad, both)
    embedding = TINY.vocab_size * TINY.n_embd
    assert untied.num_parameters() - tied.num_parameters() == embedding  # tied weight counted once


def grads(model: TransformerLM) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 7])  # one chunk; 7 rows, which does not divide B*T = 64
def test_training_loss_path_equals_plain_cross_entropy_in_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch, tie_weights: bool, chunk_rows: int | None
) -> None:
    """need_logits=False (LinearCrossEntropy, the training step's path) is the plain path up to fp32 rounding."""
    if chunk_rows is not None:
        monkeypatch.setitem(lm.model._CE_CHUNK_LOGITS, "cpu", chunk_rows * TINY.vocab_size)
    model = make(tie_weights=tie_weights, gradient_checkpointing=chunk_rows is not None).train()
    idx, targets = tokens(2, 32), tokens(2, 32, seed=2)
    targets[0, :5] = -100  # ignored positions count in neither the mean nor the gradients
    _, plain = model(idx, targets)
    plain.backward()
    expected = grads(model)
    logits, fused = model(idx, targets, need_logits=False)
    assert logits is None
    (3.0 * fused).backward()  # a scaled loss (gradient accumulation, GradScaler) scales the gradients
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for name, g in grads(model).items():
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(g, 3.0 * expected[name], atol=1e-7, rtol=1e-5, msg=name)


def test_training_loss_path_without_grad_and_under_bf16_autocast() -> None:
    model = make()
    idx, targets = tokens(2, 32), tokens(2, 32, seed=2)
    with torch.no_grad():  # evaluation: the loss only, no gradient work
        torch.testing.assert_close(model(idx, targets, need_logits=False)[1], model(idx, targets)[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls in bf16 as in nn.Linear, softmax in fp32
        _, plain = model(idx, targets)
        plain.backward()
        expected = grads(model)
        _, fused = model(idx, targets, need_logits=False)
        fused.backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, atol=1e-3, rtol=1e-3)
    for name, g in grads(model).items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, expected[name], atol=1e-3, rtol=0.05, msg=name)


def _fused_and_plain(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """LinearCrossEntropy and F.cross_entropy (per row) on exactly ``logits``: h = I, weight = logits.T."""
    out = []
    for fused in (True, False):
        h = torch.eye(logits.size(0)).requires_grad_()
        weight = logits.t().clone().requires_grad_()
        if fused:
            loss = lm.model.LinearCrossEntropy.apply(h, weight, targets, -100)
            loss.backward()
        else:
            loss = F.cross_entropy(h @ weight.t(), targets, reduction="none")
            loss.mean().backward()
        out += [loss.detach(), h.grad, weight.grad]
    return tuple(out)


def test_training_loss_of_far_off_targets_is_exact_until_the_cap_and_their_gradients_always() -> None:
    """The fused path's loss is -log p of the target. For targets 30-60 nats below the top logit (p 1e-13 to 1e-26)
    that is F.cross_entropy's; past ~87 nats p underflows in fp32 and the row loss is capped at -log(float32 tiny),
    while its gradient still equals the plain path's."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(6)
    for row, gap in [(1, 30.0), (2, 45.0), (3, 60.0), (4, 200.0)]:
        logits[row, row] = logits[row].max() - gap
    loss, h_grad, w_grad, rows, h_expected, w_expected = _fused_and_plain(logits, targets)
    cap = -math.log(torch.finfo(torch.float32).tiny)  # 87.34
    assert rows[4] > cap + 100  # row 4's true loss is past the cap...
    torch.testing.assert_close(
        loss, (rows.sum() - rows[4] + cap) / 6, atol=1e-5, rtol=1e-6
    )  # ...only it is capped
    torch.testing.assert_close(h_grad, h_expected, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(w_grad, w_expected, atol=1e-7, rtol=1e-5)
    loss, *_ = _fused_and_plain(logits[:4], targets[:4])  # without row 4: the mean of the exact row losses
    torch.testing.assert_close(loss, rows[:4].mean(), atol=1e-5, rtol=1e-6)


def test_tiny_preset_has_exactly_658944_parameters() -> None:
    model = TransformerLM(ModelConfig())
    assert model.num_parameters() == 658_944
    assert model.num_parameters(non_embedding=True) == 658_944 - 2048 * 128
    assert model.num_parameters() == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_parameter_count_matches_formula_without_bias() -> None:
    cfg = dataclasses.replace(TINY, bias=False, mlp_dim=48)
    C, H, V, L = cfg.n_embd, cfg.mlp_hidden, cfg.vocab_size, cfg.n_layer
    per_block = 2 * C + 3 * C * C + C * C + 2 * C * H  # two LayerNorm weights, qkv, proj, MLP
    assert TransformerLM(cfg).num_parameters() == V * C + L * per_block + C


def test_positional_encoding_is_a_fixed_non_persistent_buffer() -> None:
    model = make()
    assert "pos_enc.table" in dict(model.named_buffers())
    assert not any("pos_enc" in name for name in model.state_dict())
    assert not any("pos_enc" in name for name, _ in model.named_parameters())
    pe = SinusoidalPositionalEncoding(n_embd=8, max_len=16)
    table = pe(16)
    assert table.shape == (16, 8)
    positions = torch.arange(16.0)
    torch.testing.assert_close(table[:, 0], torch.sin(positions))
    torch.testing.assert_close(table[:, 1], torch.cos(positions))
    torch.testing.assert_close(table[:, 6], torch.sin(positions / 10000 ** (6 / 8)))
    torch.testing.assert_close(pe(3, offset=5), table[5:8])
    with pytest.raises(ValueError):
        pe(4, offset=13)


def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = make().train()
    ckpt = TransformerLM(dataclasses.replace(TINY, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real_checkpoint = lm.model.checkpoint
    monkeypatch.setattr(lm.model, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    idx, targets = tokens(2, 32), tokens(2, 32, seed=4)
    loss_plain, loss_ckpt = plain(idx, targets)[1], ckpt(idx, targets)[1]
    assert len(calls) == TINY.n_layer  # one checkpoint per block
    loss_plain.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    ckpt.eval()(idx)
    assert len(calls) == TINY.n_layer  # no checkpointing outside training


def test_sequence_longer_than_block_size_is_an_error() -> None:
    model = make()
    model(tokens(1, TINY.block_size))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, TINY.block_size + 1))


def test_init_stds_follow_gpt2_with_smaller_residual_projections() -> None:
    cfg = dataclasses.replace(TINY, n_embd=128, n_layer=8, n_head=4, vocab_size=1000)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.blocks:
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.mlp.c_proj.bias == 0)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.ln_f.weight == 1) and torch.all(model.ln_f.bias == 0)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("chunks", [(10, 1, 1, 1, 1, 1), (5, 4, 1, 6, 1, 15)])
def test_forward_cached_matches_full_forward(attention: str, chunks: tuple[int, ...]) -> None:
    model = make(attention=attention)
    idx = tokens(2, sum(chunks))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    assert cache.k[0].shape == (2, TINY.n_head, TINY.block_size, TINY.head_dim)
    start = 0
    with torch.no_grad():
        for t in chunks:  # prefill, then single tokens and chunks after a non-empty cache
            logits = model.forward_cached(idx[:, start : start + t], cache)
            assert logits.shape == (2, t, TINY.vocab_size)
            torch.testing.assert_close(logits, full[:, start : start + t], atol=1e-5, rtol=0)
            start += t
            assert cache.length == start


def test_forward_cached_refuses_to_overflow_block_size() -> None:
    model = make()
    cache = model.new_kv_cache(batch_size=1)
    with torch.no_grad():
        model.forward_cached(tokens(1, TINY.block_size - 1), cache)
        model.forward_cached(tokens(1, 1), cache)
        with pytest.raises(ValueError, match="block_size"):
            model.forward_cached(tokens(1, 1), cache)
    with pytest.raises(ValueError, match="batch"):
        model.forward_cached(tokens(2, 1), model.new_kv_cache(batch_size=1))
