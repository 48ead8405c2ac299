"""The training loop, written by hand and launcher-agnostic.

``train(cfg)`` runs in one process. A launcher (lmplatform's Ray Train wrapper) passes a
:class:`DistributedContext` (rank, world size, device, how to wrap the model in DDP, how to agree on a float)
and :class:`Hooks` (where metrics and checkpoints go, when to stop). The loop itself never imports a launcher.

Per optimizer step: ``grad_accum_steps`` micro-batches (``no_sync`` on all but the last under DDP), loss
scaled by 1/accum, gradients unscaled (fp16) and clipped by global norm, AdamW step, then the LR for the next
step from warmup + cosine/linear decay over the run's progress. Progress is the furthest of the configured
budgets (steps, tokens, wall-clock seconds), so a 120-second run decays its LR to ``min_lr`` exactly at 120 s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lm.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    load_weights_into,
    restore_rng_state,
)
from lm.config import ExperimentConfig, OptimConfig, TrainConfig, flatten, to_dict
from lm.data import BlockSampler, PreparedData, prepare_data
from lm.evaluate import EvalResult, evaluate_split
from lm.model import TransformerLM

log = logging.getLogger("lm.train")


class TrainError(RuntimeError):
    """Training cannot start or continue (bad device, incompatible checkpoint, ...)."""


# --------------------------------------------------------------------------------------------------------------
# Seams for launchers


def _identity(model: nn.Module) -> nn.Module:
    return model


def _same(value: float) -> float:
    return value


@dataclass
class DistributedContext:
    """How this process fits in a data-parallel group; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: from train.device
    wrap_model: Callable[[nn.Module], nn.Module] = _identity  # e.g. DDP
    broadcast: Callable[[float], float] = _same  # rank 0's value on every rank (keeps time budgets in step)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs."""
        return self.rank == 0


class Hooks:
    """Callbacks from the loop. Subclass and override; the defaults do nothing."""

    def on_start(self) -> None:
        """Once, after model, data and resume are ready and before the training clock starts (every rank):
        set-up work finished here is not charged to a ``train.max_seconds`` budget."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics every ``train.log_interval`` steps (every rank)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics after each evaluation (every rank)."""

    def on_checkpoint(self, step: int, metrics: dict[str, float], path: Path | None) -> None:
        """After a checkpoint was saved; ``path`` is None on ranks other than 0 (which do not write)."""

    def should_stop(self) -> bool:
        """Return True to end training early (the final evaluation and checkpoint still happen)."""
        return False


@dataclass
class TrainResult:
    """What a finished run produced."""

    step: int
    tokens: int
    elapsed: float  # training wall clock, seconds (final evaluation not included)
    out_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# Pieces that tests and other launchers reuse


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; explicit specs are checked."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            f"train.device={spec!r} but CUDA is not available here; use train.device=auto or cpu"
        )
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp on this device, or None for fp32.

    'auto' is bf16 (or fp16 without bf16 support) on CUDA. On a CPU it is bf16 only with native bf16 (AVX512-BF16
    or AMX): there the small preset trains 1.46x faster than in fp32 (the tiny one 1.05x), while a CPU without it
    emulates bf16 and ran 17x slower than fp32. Other devices: off.
    """
    if amp == "off" or (amp == "auto" and device.type not in ("cuda", "cpu")):
        return None
    if amp == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        if device.type != "cuda":
            raise TrainError(
                f"train.amp=fp16 needs a CUDA device (train.device is {device}); use bf16 or off"
            )
        return torch.float16
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only; biases, LayerNorm and (by default) embeddings not."""
    decay, no_decay = [], []
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for _, p in model.named_parameters():
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


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused kernels where the device has them."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )


def lr_at(optim: OptimConfig, step: int, progress: float, warmup_progress: float) -> float:
    """Learning rate for ``step``: linear warmup over ``warmup_steps``, then decay over the remaining progress.

    ``progress`` in [0, 1] is how far the run is through its budget; ``warmup_progress`` is the progress at
    which warmup ended. With a step budget this is the textbook schedule:
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (max_steps - warmup)))``.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1.0 - warmup_progress, 1e-12)
    q = min(max((progress - warmup_progress) / span, 0.0), 1.0)
    if optim.schedule == "linear":
        return optim.lr - (optim.lr - optim.min_lr) * q
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))


def budget_progress(train: TrainConfig, step: int, tokens: int, elapsed: float) -> float:
    """How far through its budget the run is: the furthest of steps, tokens and seconds (1.0 = done)."""
    fractions = [0.0]
    if train.max_steps is not None:
        fractions.append(step / train.max_steps)
    if train.max_tokens is not None:
        fractions.append(tokens / train.max_tokens)
    if train.max_seconds is not None:
        fractions.append(elapsed / train.max_seconds)
    return max(fractions)


# --------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    warmup_progress: float | None = None


def train(
    cfg: ExperimentConfig,
    data: PreparedData | None = None,
    hooks: Hooks | None = None,
    dist: DistributedContext | None = None,
    resume: bool | str | Path = True,
) -> TrainResult:
    """Train ``cfg`` to its budget, evaluate on the full validation split and save checkpoints.

    ``resume=True`` continues from the newest checkpoint in ``train.out_dir`` if there is one; a path resumes
    from that checkpoint directory; False starts fresh (existing step checkpoints are left alone until pruned).
    """
    hooks = hooks or Hooks()
    dist = dist or DistributedContext()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = dist.device or resolve_device(tc.device)
    amp_dtype = resolve_amp(tc.amp, device)
    out_dir = Path(tc.out_dir)
    manager = CheckpointManager(out_dir, tc.keep_last)

    data = data or prepare_data(cfg, progress=dist.is_main)
    seed_everything(tc.seed)  # identical initial weights on every rank
    model = TransformerLM(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler = BlockSampler(
        data.tokens("train"), cfg.model.block_size, tc.batch_size, seed=tc.seed, rank=dist.rank,
        world_size=dist.world_size,
    )  # fmt: skip
    state = _State()
    resumed_from = _resume_path(manager, resume)
    if resumed_from is not None:
        _restore(resumed_from, model, optimizer, scaler, sampler, state, cfg)
        log.info("resumed from %s at step %d (%.1fs trained)", resumed_from, state.step, state.elapsed)
    else:
        seed_everything(tc.seed + dist.rank)  # dropout noise differs per rank

    wrapped = dist.wrap_model(model)
    if tc.compile:
        wrapped = torch.compile(wrapped)
    autocast = autocast_context(device, amp_dtype)
    tokens_per_step = cfg.tokens_per_step * dist.world_size
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}

    def evaluate(max_batches: int | None) -> EvalResult:
        return evaluate_split(
            model, data.tokens("val"), data.num_bytes("val"), cfg.model.block_size,
            batch_size=max(tc.batch_size, 32), device=device, max_batches=max_batches, autocast=autocast,
        )  # fmt: skip

    def save(metrics: dict[str, float]) -> Path | None:
        path = None
        if dist.is_main:
            path = manager.save(
                state.step, model=model, cfg=cfg, tokenizer=data.tokenizer_path, metrics=metrics,
                trainer_state=_trainer_state(optimizer, scaler, sampler, state),
            )  # fmt: skip
        hooks.on_checkpoint(state.step, metrics, path)
        return path

    if dist.is_main:
        log.info(
            "training %s: %s parameters (%s non-embedding), %d tokens/step, device %s, amp %s, budget %s",
            cfg.name, f"{model.num_parameters():,}", f"{model.num_parameters(non_embedding=True):,}",
            tokens_per_step, device, amp_dtype or "off", _describe_budget(tc),
        )  # fmt: skip
    model.train()
    hooks.on_start()
    t_start = time.perf_counter() - state.elapsed
    t_log, tokens_log = time.perf_counter(), state.tokens
    last_path: Path | None = None
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    try:
        while True:
            state.elapsed = (
                dist.broadcast(time.perf_counter() - t_start)
                if tc.max_seconds
                else (time.perf_counter() - t_start)
            )
            progress = budget_progress(tc, state.step, state.tokens, state.elapsed)
            if progress >= 1.0 or hooks.should_stop():
                break
            if state.warmup_progress is None and state.step >= cfg.optim.warmup_steps:
                state.warmup_progress = progress
            lr = lr_at(cfg.optim, state.step, progress, state.warmup_progress or 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr

            for micro in range(tc.grad_accum_steps):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last_micro = micro == tc.grad_accum_steps - 1
                sync = (
                    contextlib.nullcontext()
                    if last_micro or not hasattr(wrapped, "no_sync")
                    else wrapped.no_sync()
                )
                with sync:
                    with autocast:
                        _, loss = wrapped(x, y)
                    scaler.scale(loss / tc.grad_accum_steps).backward()
                loss_sum += loss.detach()
                loss_count += 1
            grad_norm = None
            if cfg.optim.grad_clip is not None:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens_per_step

            if state.step % tc.log_interval == 0:
                now = time.perf_counter()
                elapsed = now - t_start
                metrics = {
                    "train_loss": (loss_sum / loss_count).item(),
                    "lr": lr,
                    "tokens_per_s": (state.tokens - tokens_log) / max(now - t_log, 1e-9),
                    "tokens": float(state.tokens),
                    "elapsed_s": elapsed,
                    "progress": budget_progress(tc, state.step, state.tokens, elapsed),
                }
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                loss_sum.zero_()
                loss_count = 0
                t_log, tokens_log = now, state.tokens
                history.append({"step": float(state.step), **metrics})
                hooks.on_log(state.step, metrics)
                if dist.is_main:
                    log.info(_progress_line(state.step, metrics))
            if tc.eval_interval and state.step % tc.eval_interval == 0:
                result = evaluate(tc.eval_max_batches)
                eval_metrics = _eval_metrics(result)
                history.append({"step": float(state.step), **eval_metrics})
                hooks.on_eval(state.step, eval_metrics)
                if dist.is_main:
                    log.info("step %d | val loss %.4f | val ppl %.2f (prefix of %d tokens)", state.step,
                             result.loss, result.perplexity, result.tokens)  # fmt: skip
            if tc.checkpoint_interval and state.step % tc.checkpoint_interval == 0:
                last_path = save(_eval_metrics(evaluate(tc.eval_max_batches)) | {"step": float(state.step)})
    except KeyboardInterrupt:
        if dist.is_main:
            log.warning("interrupted at step %d: saving a checkpoint so the run can resume", state.step)
            save({"step": float(state.step), "interrupted": 1.0})
        raise

    state.elapsed = time.perf_counter() - t_start
    final = evaluate(None)
    metrics = _eval_metrics(final) | {
        "step": float(state.step),
        "tokens": float(state.tokens),
        "train_seconds": state.elapsed,
    }
    history.append(dict(metrics))
    hooks.on_eval(state.step, metrics)
    last_path = save(metrics)
    if dist.is_main:
        log.info(
            "done: step %d, %.1fs, val loss %.4f, val ppl %.2f, %.4f bits/byte (%d val tokens)",
            state.step, state.elapsed, final.loss, final.perplexity, final.bits_per_byte, final.tokens,
        )  # fmt: skip
    best = manager.best_path if dist.is_main and manager.best_path.exists() else None
    return TrainResult(
        state.step, state.tokens, state.elapsed, out_dir, last_path, best, metrics, history, resumed_from
    )


def _eval_metrics(result: EvalResult) -> dict[str, float]:
    return {"val_loss": result.loss, "val_ppl": result.perplexity, "val_bpb": result.bits_per_byte}


def _trainer_state(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, sampler: BlockSampler, state: _State
) -> dict[str, Any]:
    return {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "warmup_progress": state.warmup_progress,
        "rng": capture_rng_state(),
    }


def _resume_path(manager: CheckpointManager, resume: bool | str | Path) -> Path | None:
    if resume is False:
        return None
    if resume is True:
        manager.clean_temp()
        return manager.latest()
    return Path(resume)


def _restore(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    sampler: BlockSampler,
    state: _State,
    cfg: ExperimentConfig,
) -> None:
    ckpt = load_checkpoint(path)
    if ckpt.config.model != cfg.model:
        raise TrainError(
            f"cannot resume from {path}: its model config differs from this run's ({ckpt.config.model} vs "
            f"{cfg.model}); use a new train.out_dir or the same model settings"
        )
    changed = _changed_settings(ckpt.config, cfg)
    if changed:
        log.warning(
            "resuming %s with settings that differ from the ones it was started with: %s (use --restart, or a "
            "new train.out_dir, to start over with them)", path, "; ".join(changed),
        )  # fmt: skip
    load_weights_into(model, ckpt.weights, path)
    trainer = ckpt.trainer_state()
    if trainer is None:
        raise TrainError(f"cannot resume from {path}: it holds weights only (no trainer.pt)")
    optimizer.load_state_dict(trainer["optimizer"])
    scaler.load_state_dict(trainer["scaler"])
    sampler.load_state_dict(trainer["sampler"])
    state.step, state.tokens, state.elapsed = trainer["step"], trainer["tokens"], trainer["elapsed"]
    state.warmup_progress = trainer["warmup_progress"]
    restore_rng_state(trainer["rng"])


def _changed_settings(saved: ExperimentConfig, now: ExperimentConfig) -> list[str]:
    """``key: old -> new`` for every setting (paths aside) that differs between a checkpoint's config and this run's."""
    before, after = flatten(to_dict(saved)), flatten(to_dict(now))
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if k != "train.out_dir"]


def _describe_budget(tc: TrainConfig) -> str:
    parts = []
    if tc.max_steps is not None:
        parts.append(f"{tc.max_steps} steps")
    if tc.max_tokens is not None:
        parts.append(f"{tc.max_tokens:,} tokens")
    if tc.max_seconds is not None:
        parts.append(f"{tc.max_seconds:g}s")
    return " or ".join(parts) + " (whichever comes first)" if len(parts) > 1 else parts[0]


def _progress_line(step: int, m: dict[str, float]) -> str:
    eta = m["elapsed_s"] * (1 - m["progress"]) / max(m["progress"], 1e-9)
    return (
        f"step {step:>6} | loss {m['train_loss']:.4f} | lr {m['lr']:.2e} | {m['tokens_per_s'] / 1000:6.1f}k tok/s "
        f"| {m['elapsed_s']:6.1f}s | {100 * m['progress']:5.1f}% | eta {_fmt_seconds(eta)}"
    )


def _fmt_seconds(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(argv: list[str] | None = None) -> int:
    """``python -m lm.train`` is ``lm train --local``."""
    from lm.cli import main as cli_main

    return cli_main(["train", "--local", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
