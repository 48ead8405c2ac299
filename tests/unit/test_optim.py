"""lm.optim: which parameters Muon takes, and that its batched fp32 update is torch.optim.Muon's."""

import pytest
import torch

from lm.config import load_config
from lm.model import TransformerLM
from lm.optim import Muon, MuonAdamW, build_optimizer, muon_parameters, orthogonalize

SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512), (384, 128)]  # tall, square, wide; two of one shape


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    for tied in (True, False):
        cfg = load_config(None, ["model.vocab_size=300", "model.n_embd=32", "model.n_head=2", "optim.optimizer=muon",
                                 "optim.muon_lr_scale=3", f"model.tie_weights={str(tied).lower()}"])  # fmt: skip
        model = TransformerLM(cfg.model)
        names = {id(p): n for n, p in model.named_parameters()}
        hidden = {names[id(p)] for p in muon_parameters(model)}
        assert hidden == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
        assert hidden and not any("emb" in n or "lm_head" in n or "ln" in n for n in hidden)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        assert isinstance(optimizer, MuonAdamW)
        (muon_group,) = optimizer.muon.param_groups
        assert muon_group["lr"] == pytest.approx(cfg.optim.lr * 3) and muon_group["lr_scale"] == 3
        assert muon_group["weight_decay"] == cfg.optim.weight_decay
        by_adamw = [p for g in optimizer.adamw.param_groups for p in g["params"]]
        assert {names[id(p)] for p in by_adamw}.isdisjoint(hidden)  # every parameter exactly once
        assert len(by_adamw) + len(hidden) == len(list(model.parameters()))
        decayed = {
            names[id(p)] for g in optimizer.adamw.param_groups if g["weight_decay"] for p in g["params"]
        }
        assert decayed == (set() if tied else {"lm_head.weight"})  # the untied head: AdamW, decayed


def _reference_step(params, grads, buffers, lr: float, weight_decay: float, momentum: float = 0.95) -> None:
    """torch.optim.Muon's update written out for one matrix at a time, in fp32 (torch runs Newton-Schulz in bf16)."""
    a, b, c = (3.4445, -4.775, 2.0315)
    for p, g, buf in zip(params, grads, buffers):
        buf.lerp_(g, 1 - momentum)
        x = g.lerp(buf, momentum)
        tall = x.size(0) > x.size(1)
        x = x.T if tall else x
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if tall else x
        p.mul_(1 - lr * weight_decay).add_(x, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


def _matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in SHAPES]


def test_muon_is_torchs_muon_batched_in_fp32() -> None:
    ours, theirs, ref = _matrices(), _matrices(), [p.detach().clone() for p in _matrices()]
    kw = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours_opt, theirs_opt = Muon(ours, **kw), torch.optim.Muon(theirs, **kw)
    buffers = [torch.zeros_like(p) for p in ref]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours_opt.step()
        theirs_opt.step()
        _reference_step(ref, grads, buffers, lr=0.01, weight_decay=0.1)
    start = _matrices()
    for p, q, r, s in zip(ours, theirs, ref, start):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)  # the same arithmetic, batched
        ours_step, torch_step = (p - s).detach().flatten(), (q - s).detach().flatten()
        assert (
            torch.nn.functional.cosine_similarity(ours_step, torch_step, dim=0) > 0.999
        )  # bf16 rounding apart
        assert (ours_step - torch_step).norm() < 0.03 * torch_step.norm()
    for p, q in zip(ours, theirs):  # the same state, so checkpoints read either way
        assert torch.equal(ours_opt.state[p]["momentum_buffer"], theirs_opt.state[q]["momentum_buffer"])


def test_orthogonalize_brings_every_singular_value_near_one() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 256, generator=gen) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)  # any scale
    values = torch.linalg.svdvals(orthogonalize(x, 5, (3.4445, -4.775, 2.0315)))
    assert values.min() > 0.6 and values.max() < 1.25, values
    raw = torch.linalg.svdvals(x[1])
    assert raw.max() / raw.min() > 2  # the input was not near-orthogonal already


def test_a_muon_step_without_gradients_changes_nothing() -> None:
    params = _matrices()
    before = [p.detach().clone() for p in params]
    optimizer = Muon(params, lr=0.01, weight_decay=0.1)
    optimizer.step()  # no gradients yet, as torch.optim.Muon allows
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()  # one matrix with a gradient: only it moves
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:]))
