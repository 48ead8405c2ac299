"""Model sizes by parameter count: the exact count of a shape, and a shape for "about N parameters".

``count_params`` is the closed form of :meth:`lm.model.TransformerLM.num_parameters` (a tied embedding counted
once, no parameters for the sinusoidal positions), so sweeps size models without building them.
``shape_for_params`` keeps the depth, heads, vocabulary and context of a model and picks the width (``n_embd``,
a multiple of ``n_head``) and then ``mlp_dim`` so the count lands within 2% of the target: what the pseudo key
``model.params`` in a sweep's ``search:`` space means.
"""

from __future__ import annotations

import dataclasses
import math

from lm.config import ConfigError, ModelConfig

TOLERANCE = 0.02  # relative distance to the target that shape_for_params guarantees
ALIGN = 8  # preferred multiple for n_embd and mlp_dim
PARAMS_KEY = "model.params"


def count_params(model: ModelConfig) -> int:
    """The exact parameter count of ``TransformerLM(model)``: equal to its ``num_parameters()``."""
    return _count(
        model.vocab_size, model.n_layer, model.n_embd, model.mlp_hidden, model.bias, model.tie_weights
    )


def _count(V: int, L: int, C: int, M: int, bias: bool, tied: bool) -> int:
    b = int(bias)
    ln = C * (1 + b)  # LayerNorm: weight, and a bias unless bias=False
    attn = 4 * C * C + b * 4 * C  # c_attn (C -> 3C) and c_proj (C -> C)
    mlp = 2 * C * M + b * (M + C)  # c_fc (C -> M) and c_proj (M -> C)
    blocks = L * (2 * ln + attn + mlp)
    embeddings = V * C * (1 if tied else 2)  # lm_head has no bias; tied, it is the embedding itself
    return embeddings + blocks + ln  # + ln_f


def shape_for_params(target: int | float | str, model: ModelConfig) -> ModelConfig:
    """``model`` with ``n_embd`` (a multiple of ``n_head``) and ``mlp_dim`` chosen so the parameter count is
    within 2% of ``target``; n_layer, n_head, vocab_size, block_size and the rest are kept.

    The MLP keeps ``model``'s ratio ``mlp_dim / n_embd`` (4 by default) as closely as the target allows;
    ``mlp_dim`` stays None when it is exactly 4 * n_embd. Raises ConfigError naming ``model.params``.
    """
    target = _as_count(target)
    V, L, H, bias, tied = model.vocab_size, model.n_layer, model.n_head, model.bias, model.tie_weights
    # Widths in multiples of 8 keep CPU matmuls on whole SIMD vectors (best of 8 interleaved timings on the 2-core
    # dev machine, under load: n_embd 168 / mlp_dim 640 made 9.5 steps/s, 164 / 677 made 6.9); only when no such
    # shape lands within 2% with the MLP ratio within 25% of the wanted one (small targets, many layers) is every
    # multiple of n_head tried.
    best = _search(target, model, math.lcm(H, ALIGN), ALIGN)
    if best is None or best[0] > math.log(1.25):
        best = _search(target, model, H, 1) or best
    if best is None:
        smallest = _count(V, L, H, 1, bias, tied)
        raise ConfigError(
            f"{PARAMS_KEY}={target:,} is not allowed: the smallest model with model.vocab_size={V}, "
            f"model.n_layer={L}, model.n_head={H} (n_embd={H}, mlp_dim=1) has {smallest:,} parameters "
            f"(its embedding table alone {V * H:,}); ask for at least "
            f"{math.ceil(smallest / (1 + TOLERANCE)):,}, or lower model.n_layer / model.n_head / model.vocab_size"
        )
    _, C, M = best
    return dataclasses.replace(model, n_embd=C, mlp_dim=None if M == 4 * C else M)


def _search(target: int, model: ModelConfig, c_step: int, m_step: int) -> tuple[float, int, int] | None:
    """(|ln(MLP ratio / model's ratio)|, n_embd, mlp_dim) in steps of ``c_step`` and ``m_step`` within 2% of
    ``target``, the MLP ratio closest to ``model``'s; None when there is none."""
    V, L, bias, tied = model.vocab_size, model.n_layer, model.bias, model.tie_weights
    ratio = model.mlp_hidden / model.n_embd
    best: tuple[float, float, int, int] | None = None  # (ratio distance, relative error, C, M)
    C = c_step
    # The count grows with C even at the smallest MLP, so once that overshoots, wider shapes only overshoot more.
    while _count(V, L, C, m_step, bias, tied) <= target * (1 + TOLERANCE):
        # count(C, M) = count(C, 0) + M * per_unit: solve for the MLP width that hits the target
        per_unit = L * (2 * C + int(bias))
        M = max(m_step, m_step * round((target - _count(V, L, C, 0, bias, tied)) / (per_unit * m_step)))
        error = abs(_count(V, L, C, M, bias, tied) - target) / target
        if error <= TOLERANCE:
            candidate = (abs(math.log(M / (C * ratio))), error, C, M)
            if best is None or candidate < best:
                best = candidate
        C += c_step
    return None if best is None else (best[0], best[2], best[3])


def _as_count(value: object) -> int:
    """A positive whole number of parameters; YAML may give 3e5 as a string or 3.0e+5 as a float."""
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not number.is_integer() or number <= 0:
        raise ConfigError(
            f"{PARAMS_KEY}={value!r} is not allowed: must be a positive whole number (a parameter count)"
        )
    return int(number)


def describe(model: ModelConfig) -> str:
    """A one-line shape: ``658,944 params (n_layer 2, n_head 4, n_embd 128, mlp 512)``."""
    return (
        f"{count_params(model):,} params (n_layer {model.n_layer}, n_head {model.n_head}, "
        f"n_embd {model.n_embd}, mlp {model.mlp_hidden})"
    )
