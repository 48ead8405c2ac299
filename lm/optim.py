"""The optimizer the training loop steps (``optim.optimizer``): AdamW, or Muon on the transformer's hidden weight
matrices with AdamW on everything else.

Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces a matrix's momentum by the nearest semi-orthogonal
matrix (a few Newton-Schulz iterations), so the update moves every direction of the matrix at the same rate
instead of mostly its few largest ones. It is meant for 2-D weights inside the network: the token embedding, the
output head, LayerNorms and biases stay with AdamW. torch's ``match_rms_adamw`` adjustment scales each matrix's
update to the RMS of a typical AdamW update (learning rate times ``0.2 * sqrt(max(rows, cols))``), so ``optim.lr``
and ``optim.weight_decay`` mean the same for both halves; ``optim.muon_lr_scale`` multiplies Muon's learning rate on
top, through the ``lr_scale`` of its parameter group, which the loop's schedule honours. Weight decay is decoupled
and applied at the group's learning rate (torch's rule), so the scale speeds it up too: at scale 2, the matrices
decay twice as fast per step as they would under AdamW.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lm.config import OptimConfig


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only; biases, LayerNorm and (by default) embeddings not."""
    decay, no_decay = [], []
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        if p.dim() >= 2 and (optim.decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The hidden weight matrices Muon updates: every trainable 2-D parameter except embeddings and the output
    head (``lm_head``, which is the embedding itself when the weights are tied)."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        excluded.add(id(head.weight))
    # parameters() yields a shared Parameter once
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in excluded]


def orthogonalize(
    updates: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float = 1e-7
) -> torch.Tensor:
    """Newton-Schulz: a batch of matrices (n, rows, cols), rows <= cols, mapped close to their nearest
    semi-orthogonal matrices (singular values near 1, in fact spread over about 0.7-1.2: the quintic's coefficients
    trade exactness for speed), as torch.optim.Muon does for one matrix."""
    a, b, c = coefficients
    x = updates / updates.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update, computed in fp32 and batched over matrices of one shape.

    The same algorithm (Nesterov momentum, torch's quintic Newton-Schulz, decoupled weight decay, the learning-rate
    adjustment) and the same state (``momentum_buffer``), but torch runs the Newton-Schulz iteration in bf16 one
    matrix at a time. On this project's 2-core CPU (native bf16) that made the tiny preset's training steps 15% slower
    than AdamW's; in fp32 and stacked by shape (each layer's matrices of a kind together), 11% in the same run
    (tokens/s medians of 8 alternating rounds, 2 threads; 12-14% in later runs). fp32 is also the more exact.
    """

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:  # torch.optim.Muon's constructor let only 2-D parameters in
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
            grads = [p.grad for p in params]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = (
                [g.lerp(b, group["momentum"]) for g, b in zip(grads, buffers)]
                if group["nesterov"]
                else buffers
            )
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, u in enumerate(updates):  # wide orientation: the Gram matrix is the smaller side squared
                by_shape.setdefault(tuple(sorted(u.shape)), []).append(i)
            lr = group["lr"]
            for indices in by_shape.values():
                wide = [
                    updates[i] if updates[i].size(0) <= updates[i].size(1) else updates[i].mT for i in indices
                ]
                out = orthogonalize(
                    torch.stack(wide).float(), group["ns_steps"], group["ns_coefficients"], group["eps"]
                )
                for i, o in zip(indices, out):
                    p = params[i]
                    o = o if tuple(o.shape) == tuple(p.shape) else o.mT
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (rows, cols) matrix."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr


class MuonAdamW:
    """Muon over some parameters and AdamW over the rest, stepped as one optimizer.

    It offers what the loop, the GradScaler and checkpoints use: ``param_groups`` (Muon's groups first; the
    schedule sets every group's ``lr``), ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict``.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # A property, not a list made once: load_state_dict gives each optimizer new group dicts.
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


Optimizer = torch.optim.Optimizer | MuonAdamW


@contextlib.contextmanager
def keeping_settings(optimizer: Optimizer) -> Iterator[None]:
    """Load a checkpoint's optimizer state inside this block and keep the settings the optimizer was built with.

    torch's ``load_state_dict`` (and DCP's, for shards) also puts back the saved groups' settings: betas, weight
    decay, Muon's momentum and ``lr_scale``. A resume that changes ``optim.weight_decay`` or ``optim.muon_lr_scale``
    would then train on with the old values while the run's config says otherwise; this run's config wins.
    """
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, built, strict=True):
        group.update(settings)


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> Optimizer:
    """AdamW over :func:`param_groups` (fused kernels where the device has them), or with ``optim.optimizer`` muon,
    Muon over :func:`muon_parameters` and AdamW over the rest."""
    fused = device.type in ("cuda", "cpu")
    groups = param_groups(model, optim)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
        )
    matrices = muon_parameters(model)
    by_muon = {id(p) for p in matrices}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in by_muon]} for g in groups]
    muon = Muon(
        [{"params": matrices, "lr_scale": optim.muon_lr_scale}],
        lr=optim.lr * optim.muon_lr_scale,
        weight_decay=optim.weight_decay,
        momentum=optim.muon_momentum,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW(
        [g for g in rest if g["params"]],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=fused,
    )
    return MuonAdamW(muon, adamw)
