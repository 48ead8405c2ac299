"""Tests for lm/precision.py: bf16 and int8 models stay close to fp32, their KV-cached decoding equals their own
recomputation, the tied embedding survives int8, the caches follow the weights, and bad values are refused.

Tolerances (a toy model at n_embd 64, random weights, logits of std about 1): every logit within 0.05 of fp32's
for bf16 (8 significant bits) and 0.2 for int8 (weights per channel, activations per call); probabilities within
0.01. Speed is measured in bench/run.py, never here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lm.config import ConfigError, ModelConfig
from lm.generate import BatchDecoder, generate
from lm.model import TransformerLM
from lm.precision import PRECISIONS, check_precision, inference_model, precision_of

CFG = ModelConfig(vocab_size=300, block_size=48, n_layer=2, n_head=4, n_embd=64)
LOGIT_TOL = {"fp32": 0.0, "bf16": 0.05, "int8": 0.2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy shapes: one thread is fastest


def make(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(CFG).eval()
    with torch.no_grad():  # logits of std about 1, as in a trained model (random init gives about 0.1)
        model.tok_emb.weight.mul_(10.0)
    return model


def prompt(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_logits_stay_close_to_fp32(precision: str) -> None:
    model = make()
    idx = prompt(2, 40)
    with torch.no_grad():
        ref = model(idx)[0]
        got = inference_model(model, precision)(idx)[0].float()
    assert 0.5 < ref.std() < 3  # the tolerances below are relative to logits of this size
    assert (got - ref).abs().max() <= LOGIT_TOL[precision]
    assert (got.softmax(-1) - ref.softmax(-1)).abs().max() <= 0.01
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_fp32_model_is_left_as_it_was(precision: str) -> None:
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_model(model, precision)
    assert fast is not model and precision_of(fast) == precision and precision_of(model) == "fp32"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    assert inference_model(model, "fp32") is model


def test_int8_quantizes_the_tied_output_projection_but_not_the_embedding() -> None:
    model = make()
    q = inference_model(model, "int8")
    assert isinstance(q.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(q.blocks[0].mlp.c_fc, torch.ao.nn.quantized.dynamic.Linear)
    assert q.tok_emb.weight.dtype == torch.float32 and torch.equal(q.tok_emb.weight, model.tok_emb.weight)
    int8_head = q.lm_head.weight().dequantize()  # its own int8 copy of the embedding, per output channel
    assert (int8_head - model.tok_emb.weight).abs().max() <= model.tok_emb.weight.abs().max() / 127


@pytest.mark.parametrize(
    "precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.float32)]
)
def test_kv_caches_follow_the_embeddings_dtype(precision: str, dtype: torch.dtype) -> None:
    fast = inference_model(make(), precision)
    assert fast.new_kv_cache(1).k[0].dtype == dtype
    assert fast.new_row_cache(2).v[0].dtype == dtype


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cached_decoding_equals_recomputation_at_the_same_precision(precision: str) -> None:
    fast = inference_model(make(), precision)
    idx = prompt(1, 8)
    cached = generate(fast, idx, 12, temperature=0.0, use_cache=True)
    recomputed = generate(fast, idx, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # and step by step, the cached logits are the recomputed ones within the precision's rounding
    cache = fast.new_kv_cache(1)
    with torch.no_grad():
        steps = [fast.forward_cached(cached[:, :8], cache)[:, -1]]
        steps += [fast.forward_cached(cached[:, t : t + 1], cache)[:, -1] for t in range(8, 19)]
        full = fast(cached[:, :19])[0][0, 7:]
    assert (torch.cat(steps).float() - full.float()).abs().max() <= max(LOGIT_TOL[precision], 1e-4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_batch_decoder_rows_decode_as_they_would_alone(precision: str) -> None:
    """The continuous-batching engine's decoder: rows at different positions, at the model's precision."""
    fast = inference_model(make(), precision)
    decoder = BatchDecoder(fast, max_rows=3)
    prompts = [prompt(1, n, seed=n)[0].tolist() for n in (5, 9, 3)]
    handles, logits = decoder.admit_many(prompts)
    tokens = {h: int(lg.argmax()) for h, lg in zip(handles, logits)}
    outs = {h: [t] for h, t in tokens.items()}
    for _ in range(6):
        logits = decoder.step(tokens)
        tokens = {h: int(lg.argmax()) for h, lg in zip(decoder.live, logits)}
        for h, t in tokens.items():
            outs[h].append(t)
    for h, p in zip(handles, prompts):
        alone = generate(fast, torch.tensor([p]), 7, temperature=0.0)[0, len(p) :].tolist()
        assert outs[h] == alone


def test_bad_precisions_are_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"precision='fp16' is not allowed: one of fp32, bf16, int8"):
        inference_model(make(), "fp16")
    with pytest.raises(ConfigError, match=r"serve.precision='INT8' is not allowed: one of fp32, bf16, int8"):
        check_precision("INT8", "serve.precision")


def test_int8_refuses_a_model_on_another_device() -> None:
    model = make()
    meta = dataclasses.replace(CFG)  # same shape, on the meta device: no memory, no GPU needed
    with torch.device("meta"):
        on_meta = TransformerLM(meta).eval()
    with pytest.raises(ConfigError, match=r"precision='int8' runs on the CPU only \(the model is on meta\)"):
        inference_model(on_meta, "int8")
    assert precision_of(inference_model(model, "int8")) == "int8"
