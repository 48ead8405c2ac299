"""The training loop, written by hand and launcher-agnostic.

``train(cfg)`` runs in one process. A launcher (lmplatform's Ray Train wrapper) passes a
:class:`DistributedContext` (rank, world size, device, how to wrap the model in DDP or shard it with FSDP
(:mod:`lm.sharding`), how to agree on a float) and :class:`Hooks` (where metrics and checkpoints go, when to
stop). The loop itself never imports a launcher.

Per optimizer step: ``grad_accum_steps`` micro-batches (no gradient sync on all but the last), loss
scaled by 1/accum, gradients unscaled (fp16) and clipped by global norm, the optimizer's step (AdamW, or Muon and
AdamW: :mod:`lm.optim`), then the LR for the next step from warmup + cosine/linear/constant/warmup-stable-decay
over the run's progress. Progress is the furthest of the configured budgets (steps, tokens, wall-clock seconds), so
a 120-second run decays its LR to ``min_lr`` exactly at 120 s.

The run in phases: :func:`_setup` (validate, resume or start clean, build model/optimizer/data), then per step
:func:`_train_step`, :func:`_evaluate_and_checkpoint` at the intervals, and :func:`_finish` (final evaluation on
the dev and val splits, last checkpoint, run record). Every in-training evaluation scores the same ``dev`` tokens
(held out of the training text), so the checkpoints that compete for ``best`` are compared fairly; ``val`` is
scored once, at the end, and is what runs report. SIGINT/SIGTERM (or ``hooks.should_stop()``) end the run at the
next step boundary with a checkpoint every rank agrees on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lm.checkpoint import (
    Checkpoint,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    load_weights_into,
    model_weights,
    read_metrics,
    read_run_record,
    restore_rng_state,
    run_lock,
    safe_rmtree,
    update_run_record,
)
from lm.config import ExperimentConfig, OptimConfig, TrainConfig, flatten, to_dict
from lm.data import BlockSampler, PreparedData, file_sha256, prepare_data
from lm.evaluate import EvalResult, evaluate_split
from lm.model import TransformerLM
from lm.optim import Optimizer, build_optimizer, keeping_settings
from lm.sharding import (
    SHARDS,
    full_weights,
    global_norm,
    has_shards,
    is_sharded,
    load_shards,
    load_unsharded,
    rank_file,
    read_rank_state,
    save_shards,
    set_gradient_sync,
)

log = logging.getLogger("lm.train")


class TrainError(RuntimeError):
    """Training cannot start or continue (bad device, incompatible checkpoint, ...)."""


class RunFinishedError(TrainError):
    """The run directory holds a run that already trained its whole budget: resuming would train nothing."""

    def __init__(self, message: str, step: int, metrics: dict[str, Any], checkpoint: Path) -> None:
        super().__init__(message)
        self.step = step
        self.metrics = metrics
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------------------
# Seams for launchers


def _identity(model: nn.Module) -> nn.Module:
    return model


def _same(values: list[float]) -> list[float]:
    return values


@dataclass
class DistributedContext:
    """How this process fits in a data-parallel group; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: from train.device
    # e.g. DDP, or lm.sharding.fsdp_wrapper (shards the model in place; the optimizer is built after it)
    wrap_model: Callable[[nn.Module], nn.Module] = _identity
    # Element-wise max over ranks: every rank sees the same elapsed time and stop request, so all stop at the same
    # step (a rank that stopped alone would deadlock the others' next all-reduce).
    all_max: Callable[[list[float]], list[float]] = _same
    # Sharded checkpoints, set on every rank or none: where a rank other than 0 writes its part
    # (``<dir>/step-NNNNNN/shards/...``) for a launcher that gathers the parts itself (Ray Train merges reported
    # directories; rank 0's part is the checkpoint directory). None: every rank writes into the checkpoint
    # directory rank 0 completes, which all ranks must then see (one machine, a shared filesystem).
    own_checkpoint_dir: Path | None = None

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
        """Metrics of every evaluation (every rank): dev_* always, val_* too at the end of the run."""

    def on_checkpoint(self, step: int, metrics: dict[str, float], path: Path | None) -> None:
        """After a checkpoint was saved (every rank). ``path`` is the directory this rank completed: the
        checkpoint on rank 0; on other ranks None, or their own part of a sharded checkpoint when
        ``DistributedContext.own_checkpoint_dir`` is set."""

    def should_stop(self) -> bool:
        """Return True to stop at this step boundary: the loop checkpoints and returns ``interrupted=True``."""
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
    interrupted: bool = False  # stopped by a signal or hooks.should_stop(); resumable from last_checkpoint
    trained_steps: int = 0  # steps this call trained (0: nothing new, e.g. a stop before the first step)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""


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


class WeightAverage:
    """An exponential moving average of a model's weights (``optim.ema_decay``), held in a copy of the model.

    The decay warms up with the run: after step ``t`` it is ``min(decay, h (1 + t) / (1 + h (1 + t)))`` for
    ``h = horizon`` (``optim.ema_horizon``), an average over about the last ``h`` of the steps so far. The random
    initial weights fade within the first steps instead of weighing on the average for hundreds, and the average
    keeps pace with a run of any length until it reaches ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float, horizon: float) -> None:
        self.decay, self.horizon = decay, horizon
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = list(zip(self.model.parameters(), model.parameters()))  # a tied weight is one parameter

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights as they are after optimizer step ``step`` (1 = the first)."""
        span = self.horizon * (1 + step)
        weight = 1.0 - min(self.decay, span / (1 + span))
        for average, current in self._pairs:
            average.lerp_(current, weight)


def lr_at(
    optim: OptimConfig, step: int, progress: float, warmup_progress: float, start_lr: float | None = None
) -> float:
    """Learning rate for ``step``: linear warmup over ``warmup_steps``, then decay over the remaining progress.

    ``progress`` in [0, 1] is how far the run is through its budget; ``warmup_progress`` is the progress at
    which the decay starts from ``start_lr`` (default ``optim.lr``: the end of warmup). With a step budget this
    is the textbook schedule: ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (max_steps -
    warmup)))``. A budget changed on resume moves the start to where the run was, so the LR never jumps back up.
    ``wsd`` holds the LR until progress ``1 - decay_fraction`` (or the decay start, if later), then decays
    linearly to ``min_lr``: a longer budget given on resume extends the stable phase.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    top = optim.lr if start_lr is None else start_lr
    if optim.schedule == "wsd":
        warmup_progress = max(warmup_progress, 1.0 - optim.decay_fraction)
        if progress < warmup_progress:
            return top
    span = max(1.0 - warmup_progress, 1e-12)
    q = min(max((progress - warmup_progress) / span, 0.0), 1.0)
    if optim.schedule in ("linear", "wsd"):
        return top - (top - optim.min_lr) * q
    return optim.min_lr + (top - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))


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
    elapsed: float = 0.0  # training wall clock, including in-training evaluations and checkpoints
    warmup_progress: float | None = None  # progress at which the LR decay starts
    decay_from_lr: float | None = None  # the LR the decay starts from (None: optim.lr)
    lr: float = 0.0  # the LR of the last step


@dataclass
class _Run:
    """Everything one training run holds while it goes (built by :func:`_setup`)."""

    cfg: ExperimentConfig
    data: PreparedData
    hooks: Hooks
    dist: DistributedContext
    device: torch.device
    model: nn.Module
    wrapped: nn.Module
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    sampler: BlockSampler
    manager: CheckpointManager
    state: _State
    run_id: str
    resumed_from: Path | None
    start_step: int
    autocast: contextlib.AbstractContextManager
    sharded: bool = False  # parameters are DTensor shards (FSDP): sharded checkpoints, gradient sync by FSDP
    ema: WeightAverage | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    evaluated: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> dev metrics (run once)

    @property
    def weights_model(self) -> nn.Module:
        """The model that is evaluated and saved as the run's weights: the average when ``optim.ema_decay`` is on."""
        return self.model if self.ema is None else self.ema.model


def train(
    cfg: ExperimentConfig,
    data: PreparedData | None = None,
    hooks: Hooks | None = None,
    dist: DistributedContext | None = None,
    resume: bool | str | Path = True,
    *,
    lock: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    handle_signals: bool = True,
) -> TrainResult:
    """Train ``cfg`` to its budget, evaluate on the dev and val splits and save checkpoints.

    ``resume=True`` continues from the newest checkpoint in ``train.out_dir`` if there is one (a run that
    already finished its budget raises :class:`RunFinishedError`); a path resumes from that checkpoint
    directory; False starts a clean run, removing the previous run's checkpoints first. ``lock=False`` when
    the caller already holds :func:`run_lock` on the directory; ``clock`` measures the time budget.
    """
    hooks = hooks or Hooks()
    dist = dist or DistributedContext()
    out_dir = Path(cfg.train.out_dir)
    with run_lock(out_dir) if lock and dist.is_main else contextlib.nullcontext():
        run = _setup(cfg, data, hooks, dist, resume)
        try:
            with _StopRequests(handle_signals) as stop:
                interrupted = _loop(run, stop, clock)
            return _finish(run, interrupted)
        except BaseException as exc:
            if dist.is_main and not isinstance(exc, RunFinishedError):
                update_run_record(
                    out_dir, status="failed", step=run.state.step, error=f"{type(exc).__name__}: {exc}"
                )
            raise


def preflight(
    cfg: ExperimentConfig,
    out_dir: Path | None = None,
    resume: bool | str | Path = True,
    data: PreparedData | None = None,
) -> Path | None:
    """Check, without training or writing, that ``cfg`` can start or resume in ``out_dir``.

    Raises :class:`RunFinishedError` when the run already trained its budget, :class:`TrainError` when its
    checkpoint has another model shape or (with ``data``) another tokenizer. Returns the checkpoint a resume
    would start from (None: a fresh start). Launchers call it before their first tracking write.
    """
    out_dir = Path(out_dir if out_dir is not None else cfg.train.out_dir)
    checked = _checked_resume(cfg, out_dir, resume, data)
    return checked[0].path if checked is not None else None


def _checked_resume(
    cfg: ExperimentConfig, out_dir: Path, resume: bool | str | Path, data: PreparedData | None
) -> tuple[Checkpoint, dict[str, Any]] | None:
    """:func:`preflight`'s checks; returns the loaded checkpoint and trainer state, so a resume reads them once."""
    path = _resume_path(CheckpointManager(out_dir), resume)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    _check_compatible(path, ckpt.config, cfg, ckpt.tokenizer_path, data)
    trainer = ckpt.trainer_state()
    if trainer is None:
        raise TrainError(f"cannot resume from {path}: it holds weights only (no trainer.pt)")
    progress = budget_progress(cfg.train, trainer["step"], trainer["tokens"], trainer["elapsed"])
    if progress >= 1.0:
        metrics = ckpt.metrics
        ppl = metrics.get("val_ppl", metrics.get("dev_ppl"))
        what = "val" if "val_ppl" in metrics else "dev"
        score = f" ({what} perplexity {ppl:.2f})" if ppl is not None else ""
        raise RunFinishedError(
            f"run {cfg.name} in {out_dir} finished at step {trainer['step']:,}{score}: its budget "
            f"({_describe_budget(cfg.train)}) is used up, so there is nothing to train",
            trainer["step"], metrics, path,
        )  # fmt: skip
    saved_optimizer, optimizer = ckpt.config.optim.optimizer, cfg.optim.optimizer
    if saved_optimizer != optimizer:
        raise TrainError(
            f"cannot resume from {path}: it was trained with optim.optimizer={saved_optimizer}, and this run asks "
            f"for {optimizer}, whose state differs; resume with optim.optimizer={saved_optimizer}, use --restart to "
            "start over, or a new run directory (--out) to keep both"
        )
    return ckpt, trainer


def _setup(
    cfg: ExperimentConfig,
    data: PreparedData | None,
    hooks: Hooks,
    dist: DistributedContext,
    resume: bool | str | Path,
) -> _Run:
    """Validate, then resume or start clean; build the model, optimizer and sampler."""
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = dist.device or resolve_device(tc.device)
    amp_dtype = resolve_amp(tc.amp, device)
    out_dir = Path(tc.out_dir)
    data = data or prepare_data(cfg, progress=dist.is_main)
    if resume is True and dist.is_main:
        CheckpointManager(out_dir).recover()  # a kill while `best` was replaced: put the old one back
    checked = _checked_resume_on_every_rank(cfg, out_dir, resume, data, dist)  # nothing written before this
    resumed_from = checked[0].path if checked is not None else None

    seed_everything(tc.seed)  # identical initial weights on every rank
    model = TransformerLM(cfg.model).to(device)
    # Wrapped before the optimizer exists: FSDP replaces the parameters by shards, which the optimizer must hold.
    wrapped = dist.wrap_model(model)
    sharded = is_sharded(model)
    unshardable = cfg.optim.unshardable() if sharded else None
    if unshardable:
        raise TrainError(f"sharded (FSDP) training does not support {unshardable}, or use ray.strategy=ddp")
    optimizer = build_optimizer(model, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler = BlockSampler(
        data.tokens("train"), cfg.model.block_size, tc.batch_size, seed=tc.seed, rank=dist.rank,
        world_size=dist.world_size,
    )  # fmt: skip
    state = _State()
    record = read_run_record(out_dir)
    if resumed_from is not None:
        assert checked is not None
        ckpt, trainer = checked
        _restore(ckpt, trainer, model, optimizer, scaler, sampler, state, cfg, dist, sharded)
        run_id = trainer.get("run_id") or ckpt.metrics.get("run_id") or uuid.uuid4().hex
        _warn_changed(resumed_from, record.get("started_config") or to_dict(ckpt.config), cfg)
        _rebase_schedule(trainer.get("budget"), state, cfg)
        log.info("resumed from %s at step %d (%.1fs trained)", resumed_from, state.step, state.elapsed)
    else:
        run_id = uuid.uuid4().hex
        if dist.is_main:
            CheckpointManager(out_dir).reset()  # --restart: nothing of the previous run survives
        seed_everything(tc.seed + dist.rank)  # dropout noise differs per rank
    manager = CheckpointManager(out_dir, tc.keep_last, run_id=run_id)
    if dist.is_main:
        started = record.get("started_config") if record.get("run_id") == run_id else None
        update_run_record(
            out_dir, run_id=run_id, status="running", step=state.step, started_config=started or to_dict(cfg)
        )
    ema = _weight_average(cfg, model, checked)
    if tc.compile:
        wrapped = torch.compile(wrapped)
    run = _Run(
        cfg, data, hooks, dist, device, model, wrapped, optimizer, scaler, sampler, manager, state, run_id,
        resumed_from, state.step, autocast_context(device, amp_dtype), sharded, ema,
    )  # fmt: skip
    if tc.compile:
        _warm_up_compiled(run)
    if dist.is_main:
        log.info(
            "training %s: %s parameters (%s non-embedding), %d tokens/step, %s, device %s, amp %s, budget %s",
            cfg.name, f"{model.num_parameters():,}", f"{model.num_parameters(non_embedding=True):,}",
            _tokens_per_step(run), "Muon + AdamW" if cfg.optim.optimizer == "muon" else "AdamW", device,
            amp_dtype or "off", _describe_budget(tc),
        )  # fmt: skip
    return run


def _loop(run: _Run, stop: _StopRequests, clock: Callable[[], float]) -> bool:
    """Train to the budget or a stop request; returns True when stopped early (interrupted)."""
    cfg, tc, state, hooks = run.cfg, run.cfg.train, run.state, run.hooks
    run.model.train()
    hooks.on_start()
    t_start = clock() - state.elapsed  # resume: the budget continues where the saved run stopped
    t_log, tokens_log = clock(), state.tokens
    loss_sum = torch.zeros((), device=run.device)
    loss_count = 0
    while True:
        elapsed, stop_flag = run.dist.all_max(
            [clock() - t_start, float(stop.requested or hooks.should_stop())]
        )
        state.elapsed = elapsed
        progress = budget_progress(tc, state.step, state.tokens, state.elapsed)
        if progress >= 1.0:
            return False
        if stop_flag:
            return True
        if state.warmup_progress is None and state.step >= cfg.optim.warmup_steps:
            state.warmup_progress = progress
        state.lr = lr_at(cfg.optim, state.step, progress, state.warmup_progress or 0.0, state.decay_from_lr)
        step_loss, grad_norm = _train_step(run, state.lr)
        loss_sum += step_loss
        loss_count += 1
        state.step += 1
        state.tokens += _tokens_per_step(run)
        if run.ema is not None:
            run.ema.update(state.step)

        if state.step % tc.log_interval == 0:
            now = clock()
            metrics = {
                "train_loss": (loss_sum / loss_count).item(),
                "lr": state.lr,
                "tokens_per_s": (state.tokens - tokens_log) / max(now - t_log, 1e-9),
                "tokens": float(state.tokens),
                "elapsed_s": now - t_start,
                "progress": budget_progress(tc, state.step, state.tokens, now - t_start),
            }
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            loss_sum.zero_()
            loss_count = 0
            t_log, tokens_log = now, state.tokens
            run.history.append({"step": float(state.step), **metrics})
            hooks.on_log(state.step, metrics)
            if run.dist.is_main:
                log.info(_progress_line(state.step, metrics))
        want_eval = bool(tc.eval_interval) and state.step % tc.eval_interval == 0
        # A step that ends a step or token budget is checkpointed once, by _finish (with its val score). The
        # elapsed time is the one all ranks agreed on: every rank must make the same choice.
        want_checkpoint = (
            bool(tc.checkpoint_interval)
            and state.step % tc.checkpoint_interval == 0
            and budget_progress(tc, state.step, state.tokens, state.elapsed) < 1.0
        )
        if want_eval or want_checkpoint:
            _evaluate_and_checkpoint(run, want_checkpoint, lambda: clock() - t_start)


def _train_step(run: _Run, lr: float) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns (mean loss, gradient norm)."""
    cfg, tc = run.cfg, run.cfg.train
    for group in run.optimizer.param_groups:  # Muon's group runs at optim.muon_lr_scale times the schedule
        group["lr"] = lr * group.get("lr_scale", 1.0)
    step_loss = torch.zeros((), device=run.device)
    for micro in range(tc.grad_accum_steps):
        x, y = run.sampler.next_batch()
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        last_micro = micro == tc.grad_accum_steps - 1
        if run.sharded:  # FSDP: reduce-scatter only after the last micro-batch (unsharded grads accumulate)
            set_gradient_sync(run.model, last_micro)
        sync = (
            contextlib.nullcontext()
            if last_micro or not hasattr(run.wrapped, "no_sync")
            else run.wrapped.no_sync()
        )
        with sync:
            with run.autocast:  # need_logits=False: no (B, T, V) logits (LinearCrossEntropy)
                _, loss = run.wrapped(x, y, need_logits=False)
            run.scaler.scale(loss / tc.grad_accum_steps).backward()
        step_loss += loss.detach() / tc.grad_accum_steps
    grad_norm = None
    if cfg.optim.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        # Over FSDP shards clip_grad_norm_ all-reduces the norm: every rank clips by the global norm.
        grad_norm = global_norm(torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip))
    loss_value = float(step_loss)
    # fp16's GradScaler skips steps with inf gradients by design; everything else non-finite is divergence,
    # stopped here, before the optimizer writes it into the weights.
    if not math.isfinite(loss_value) or (
        grad_norm is not None and not math.isfinite(grad_norm) and not run.scaler.is_enabled()
    ):
        raise TrainError(
            f"step {run.state.step + 1}: the loss is {loss_value} and the gradient norm {grad_norm}: training "
            f"diverged (the weights were not updated with it); lower optim.lr, keep optim.grad_clip, or use "
            f"train.amp=off. The last good checkpoint is {run.last_checkpoint or 'none (none saved yet)'}"
        )
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _evaluate_dev(run: _Run) -> dict[str, float]:
    """Score the dev tokens every in-training evaluation shares (once per step), report it to the hooks."""
    step = run.state.step
    if step not in run.evaluated:
        tc = run.cfg.train
        result = evaluate_split(
            run.weights_model, run.data.tokens("dev"), run.data.num_bytes("dev"), run.cfg.model.block_size,
            batch_size=max(tc.batch_size, 32), device=run.device, max_batches=tc.eval_max_batches,
            text_name="dev",
        )  # fmt: skip
        metrics = _eval_metrics(result, "dev")
        run.evaluated = {step: metrics}
        run.history.append({"step": float(step), **metrics})
        run.hooks.on_eval(step, metrics)
        if run.dist.is_main:
            log.info("step %d | dev loss %.4f | dev ppl %.2f (%d tokens)", step, result.loss, result.perplexity,
                     result.tokens)  # fmt: skip
    return run.evaluated[step]


def _evaluate_and_checkpoint(run: _Run, checkpoint: bool, elapsed: Callable[[], float]) -> None:
    """Evaluate on dev (reaching the hooks) and, when asked, checkpoint with the time spent so far included."""
    metrics = _evaluate_dev(run)
    if checkpoint:
        run.state.elapsed = elapsed()  # the saved clock includes this step and this evaluation
        _save(run, metrics | {"step": float(run.state.step)})


def _save(run: _Run, metrics: dict[str, float], status: str = "running") -> Path | None:
    """Checkpoint on rank 0 (the others only call the hook, which Ray needs from every rank); a sharded model's
    checkpoint is written by every rank (:func:`_save_shards`)."""
    path = None
    state = run.state
    if run.sharded:
        own, staging, weights = _save_shards(run)
        rng: list[dict[str, Any]] = []  # each rank's RNG is in its own file under shards/
    else:
        own, staging, weights = None, None, None
        rng = _gather_rng(run.dist)  # a collective: every rank takes part before rank 0 writes
    if run.dist.is_main:
        path = run.manager.save(
            state.step, model=run.weights_model, cfg=run.cfg, tokenizer=run.data.tokenizer_path, metrics=metrics,
            trainer_state=_trainer_state(run, rng, finished=status == "finished"), weights=weights,
            staging=staging,
        )  # fmt: skip
        update_run_record(run.manager.out_dir, status=status, step=state.step, last_checkpoint=str(path))
        new_best = read_metrics(run.manager.best_path).get("step") == state.step
        log.info(
            "step %d | saved checkpoint %s%s", state.step, path, " (new best on dev)" if new_best else ""
        )
    run.last_checkpoint = path
    run.hooks.on_checkpoint(state.step, metrics, path or own)
    return path


def _save_shards(run: _Run) -> tuple[Path | None, Path | None, dict[str, torch.Tensor] | None]:
    """Every rank writes its model and optimizer shard and its RNG; rank 0 gathers the full weights for export.

    Returns (this rank's own completed directory or None, the staging dir rank 0 completes or None, the full
    weights on rank 0 or None). Ranks share rank 0's staging dir unless ``own_checkpoint_dir`` gives them one.
    """
    dist, step = run.dist, run.state.step
    staging = run.manager.staging_path(step)
    if dist.is_main and staging.exists():  # left by a kill during an earlier save of this step
        safe_rmtree(staging, run.manager.out_dir)
    _barrier(dist)  # nobody writes into the staging dir before it is clean
    own = None
    if dist.is_main or dist.own_checkpoint_dir is None:
        target = staging
    else:
        own = Path(dist.own_checkpoint_dir) / f"step-{step:06d}"
        target = own.parent / f".tmp-{own.name}-{os.getpid()}"
        for old in (own, target):
            if old.exists():
                safe_rmtree(old, dist.own_checkpoint_dir)
    save_shards(target, run.model, run.optimizer, dist.rank, {"rng": capture_rng_state(),
                "world_size": dist.world_size})  # fmt: skip
    weights = full_weights(run.model)  # a collective: the full model on rank 0 for model.safetensors
    missing = []  # every rank has written by now: in a shared staging dir, rank 0 must see every rank's files
    if dist.is_main and dist.own_checkpoint_dir is None:
        missing = [r for r in range(dist.world_size) if not (staging / SHARDS / rank_file(r)).is_file()]
    if dist.all_max([float(len(missing))])[0]:  # every rank stops here, not only rank 0
        raise TrainError(
            f"some ranks wrote their checkpoint shards where rank 0 cannot see them (in {staging}, rank 0 misses "
            f"ranks {missing or '?'}): workers on several machines need the run directory on a filesystem every "
            "node mounts, or remote storage"
        )
    if own is not None:
        os.replace(target, own)
        for old in sorted(own.parent.glob("step-*"))[: -run.cfg.train.keep_last]:
            safe_rmtree(old, dist.own_checkpoint_dir)
    return own, staging if dist.is_main else None, weights if dist.is_main else None


def _barrier(dist: DistributedContext) -> None:
    if dist.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _finish(run: _Run, interrupted: bool) -> TrainResult:
    """Last checkpoint; at the end of the budget also the val split, the reported number, for it and ``best``."""
    state, tc = run.state, run.cfg.train
    metrics = dict(_evaluate_dev(run))
    if interrupted:
        metrics |= {"step": float(state.step), "interrupted": 1.0}
        if run.dist.is_main:
            log.warning(
                "stopped at step %d: saving a checkpoint; run the same command again to resume", state.step
            )
        _save(run, metrics, status="interrupted")
    else:
        val = _evaluate_val(run, run.weights_model)
        metrics |= val | {
            "step": float(state.step),
            "tokens": float(state.tokens),
            "train_seconds": state.elapsed,
        }
        run.history.append({"step": float(state.step), **val})
        run.hooks.on_eval(state.step, val)
        _save(run, metrics, status="finished")
        if run.dist.is_main:
            log.info(
                "done: step %d, %.1fs, val loss %.4f, val ppl %.2f, %.4f bits/byte (%d val tokens)",
                state.step, state.elapsed, val["val_loss"], val["val_ppl"], val["val_bpb"], val["val_tokens"],
            )  # fmt: skip
            _score_best_on_val(run)
            update_run_record(run.manager.out_dir, metrics=metrics)
    # No rank returns before rank 0's last checkpoint is on disk: a caller that starts the next run on every rank
    # (a resume) must find it there, not a directory half-way through being replaced.
    _barrier(run.dist)
    best = run.manager.best_path if run.dist.is_main and run.manager.best_path.exists() else None
    return TrainResult(
        state.step, state.tokens, state.elapsed, Path(tc.out_dir), run.last_checkpoint, best, metrics,
        run.history, run.resumed_from, interrupted, state.step - run.start_step,
        read_metrics(best) if best is not None else {}, run.run_id,
    )  # fmt: skip


def _evaluate_val(run: _Run, model: nn.Module) -> dict[str, float]:
    result = evaluate_split(
        model, run.data.tokens("val"), run.data.num_bytes("val"), run.cfg.model.block_size,
        batch_size=max(run.cfg.train.batch_size, 32), device=run.device, text_name="val",
    )  # fmt: skip
    return _eval_metrics(result, "val") | {"val_tokens": float(result.tokens)}


def _score_best_on_val(run: _Run) -> None:
    """When an earlier checkpoint won on dev, score it on val too, so `best` carries the number users read."""
    best = run.manager.best_path
    if not best.exists() or "val_loss" in read_metrics(best):
        return
    model = TransformerLM(run.cfg.model).to(run.device)
    load_weights_into(model, load_checkpoint(best).weights, best)
    val = _evaluate_val(run, model)
    run.manager.update_best_metrics(val)
    log.info("best checkpoint (step %d by dev loss): val ppl %.2f", read_metrics(best).get("step", -1),
             val["val_ppl"])  # fmt: skip


def _warm_up_compiled(run: _Run) -> None:
    """Compile before the clock starts: one forward and backward on the next batch, leaving no trace."""
    sampler_state, rng = run.sampler.state_dict(), capture_rng_state()
    t0 = time.perf_counter()
    x, y = run.sampler.next_batch()
    with run.autocast:
        _, loss = run.wrapped(x.to(run.device), y.to(run.device), need_logits=False)
    loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    run.sampler.load_state_dict(sampler_state)
    restore_rng_state(rng)
    if run.dist.is_main:
        log.info("torch.compile warm-up took %.1fs (not charged to the budget)", time.perf_counter() - t0)


class _StopRequests:
    """SIGINT/SIGTERM set a flag the loop reads at each step boundary; a second Ctrl-C aborts at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "%s: finishing this step, then saving a checkpoint (Ctrl-C again aborts without saving)",
            signal.Signals(signum).name,
        )


def _tokens_per_step(run: _Run) -> int:
    return run.cfg.tokens_per_step * run.dist.world_size


def _eval_metrics(result: EvalResult, split: str) -> dict[str, float]:
    return {
        f"{split}_loss": result.loss,
        f"{split}_ppl": result.perplexity,
        f"{split}_bpb": result.bits_per_byte,
    }


def _trainer_state(run: _Run, rng: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
    state = run.state
    return {
        # A sharded model's optimizer state is in shards/, each rank's part written by that rank.
        "optimizer": None if run.sharded else run.optimizer.state_dict(),
        # With a weight average, model.safetensors holds the average; training resumes from these.
        "train_weights": None if run.ema is None else model_weights(run.model),
        "sharded": run.sharded,
        "scaler": run.scaler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "warmup_progress": state.warmup_progress,
        "decay_from_lr": state.decay_from_lr,
        "lr": state.lr,
        "budget": _budget(run.cfg.train),
        "finished": finished,
        "run_id": run.run_id,
        # Every rank's RNG, so dropout masks still differ by rank after a resume (rank 0 writes them all).
        "rng": rng,
    }


def _gather_rng(dist: DistributedContext) -> list[dict[str, Any]]:
    states = [capture_rng_state()]
    if dist.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    return states


def _budget(tc: TrainConfig) -> dict[str, float | None]:
    return {"max_steps": tc.max_steps, "max_tokens": tc.max_tokens, "max_seconds": tc.max_seconds}


def _checked_resume_on_every_rank(
    cfg: ExperimentConfig,
    out_dir: Path,
    resume: bool | str | Path,
    data: PreparedData,
    dist: DistributedContext,
) -> tuple[Checkpoint, dict[str, Any]] | None:
    """:func:`_checked_resume` on every rank, which must all resume from the same step (or all start fresh).

    A rank that fails the checks, or ranks that disagree, make every rank raise here, where a rank that went on
    alone would deadlock the group's next all-reduce.
    """
    try:
        checked, error = _checked_resume(cfg, out_dir, resume, data), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        checked, error = None, exc
    step = float(checked[1]["step"]) if checked is not None else -1.0
    failed_rank, highest, minus_lowest = dist.all_max(
        [float(dist.rank) if error is not None else -1.0, step, -step]
    )
    if error is not None:
        raise error
    if failed_rank >= 0:
        raise TrainError(
            f"rank {int(failed_rank)} could not resume from {out_dir} (its error is in its log), so rank "
            f"{dist.rank} stops too"
        )
    if highest != -minus_lowest:
        mine = f"{checked[0].path} (step {int(step)})" if checked is not None else "a fresh start"
        raise TrainError(
            f"the ranks disagree on where to resume: rank {dist.rank} found {mine}, and the group's steps range from "
            f"{_resume_step_name(-minus_lowest)} to {_resume_step_name(highest)}; every rank must see the same run "
            "directory (one filesystem all nodes mount) and be given the same resume argument"
        )
    return checked


def _resume_step_name(step: float) -> str:
    return "a fresh start" if step < 0 else f"step {int(step)}"


def _resume_path(manager: CheckpointManager, resume: bool | str | Path) -> Path | None:
    if resume is False:
        return None
    if resume is True:
        return manager.latest()
    return Path(resume)


def _check_compatible(
    path: Path, saved: ExperimentConfig, cfg: ExperimentConfig, tokenizer: Path, data: PreparedData | None
) -> None:
    """A resume needs the same model shape and the same tokenizer as the checkpoint."""
    if saved.model != cfg.model:
        before, after = to_dict(saved.model), to_dict(cfg.model)
        diff = ", ".join(f"model.{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k])
        raise TrainError(
            f"cannot resume from {path}: the model shape differs ({diff}); use --restart to start over, or a new "
            "run directory (--out) to keep both"
        )
    if data is not None and file_sha256(tokenizer) != file_sha256(data.tokenizer_path):
        raise TrainError(
            f"cannot resume from {path}: its tokenizer differs from the prepared data's ({data.tokenizer_path}); "
            "was the corpus or the tokenizer changed? Use --restart to train from scratch on the new data"
        )


def _restore(
    ckpt: Checkpoint,
    trainer: dict[str, Any],
    model: nn.Module,
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    sampler: BlockSampler,
    state: _State,
    cfg: ExperimentConfig,
    dist: DistributedContext,
    sharded: bool = False,
) -> None:
    """Load weights, optimizer, sampler, counters and this rank's RNG from a checked checkpoint.

    A sharded checkpoint loads into a sharded or plain model of any world size (DCP reshards), a plain one into
    either too.
    """
    # With a weight average, model.safetensors holds the average and trainer.pt the weights training continues from.
    weights = trainer.get("train_weights") or ckpt.weights
    with keeping_settings(optimizer):  # the checkpoint's moments, this run's betas, decay and scales
        if trainer.get("sharded"):
            if not has_shards(ckpt.path):
                raise TrainError(
                    f"cannot resume from {ckpt.path}: it was written sharded but has no complete shards/"
                )
            load_shards(ckpt.path, model, optimizer)
        elif sharded:  # a ddp or one-process run continued sharded
            try:
                load_unsharded(model, optimizer, weights, trainer["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise TrainError(f"cannot resume from {ckpt.path} sharded: {exc}") from exc
        else:
            load_weights_into(model, weights, ckpt.path)
            optimizer.load_state_dict(trainer["optimizer"])
    scaler.load_state_dict(trainer["scaler"])
    sampler.load_state_dict(trainer["sampler"])
    state.step, state.tokens, state.elapsed = trainer["step"], trainer["tokens"], trainer["elapsed"]
    state.warmup_progress = trainer["warmup_progress"]
    state.decay_from_lr = trainer.get("decay_from_lr")
    state.lr = trainer.get("lr", 0.0)
    rng = trainer["rng"]
    if trainer.get("sharded"):  # every rank saved its own RNG next to its shard
        own = read_rank_state(ckpt.path, dist.rank)
        if own is not None and own.get("world_size") == dist.world_size:
            rng = [own["rng"]] * dist.world_size  # rng[dist.rank] below is this rank's own stream
        else:
            rank0 = read_rank_state(ckpt.path, 0)
            if rank0 is None:
                raise TrainError(f"cannot resume from {ckpt.path}: shards/ lacks rank 0's state")
            rng = [rank0["rng"]]
    # One stream per rank; a different world size keeps rank 0's stream and reseeds the others.
    if isinstance(rng, list):
        if dist.rank < len(rng) and len(rng) == dist.world_size:
            restore_rng_state(rng[dist.rank])
        else:
            restore_rng_state(rng[0])
            if dist.rank:
                seed_everything(cfg.train.seed + dist.rank + state.step)
    else:  # checkpoints written before per-rank RNG
        restore_rng_state(rng)


def _weight_average(
    cfg: ExperimentConfig, model: nn.Module, checked: tuple[Checkpoint, dict[str, Any]] | None
) -> WeightAverage | None:
    """The run's weight average (None when ``optim.ema_decay`` is 0), restored when the checkpoint saved one.

    A checkpoint without an average (written with ``optim.ema_decay`` at 0) starts it from the training weights.
    """
    if not cfg.optim.ema_decay:
        return None
    ema = WeightAverage(model, cfg.optim.ema_decay, cfg.optim.ema_horizon)
    if checked is not None and checked[1].get("train_weights") is not None:
        load_weights_into(ema.model, checked[0].weights, checked[0].path)
    return ema


def _rebase_schedule(budget: dict[str, Any] | None, state: _State, cfg: ExperimentConfig) -> None:
    """A budget changed on resume: decay from the LR the run had reached, never back up towards the peak."""
    if budget is None or budget == _budget(cfg.train):
        return
    if state.step < cfg.optim.warmup_steps:
        log.warning(
            "the budget changed on resume (%s -> %s): still warming up, so the decay will span the new budget",
            _describe_budget_dict(budget), _describe_budget(cfg.train),
        )  # fmt: skip
        return
    progress = budget_progress(cfg.train, state.step, state.tokens, state.elapsed)
    state.warmup_progress, state.decay_from_lr = progress, state.lr or cfg.optim.min_lr
    optim = cfg.optim
    how = {
        "constant": "stays at optim.lr (constant schedule)",
        "wsd": f"holds it until the last {optim.decay_fraction:g} of the new budget, then decays to "
        f"optim.min_lr={optim.min_lr:.2e}",
    }.get(optim.schedule, f"decays to optim.min_lr={optim.min_lr:.2e} over the rest of the new budget")
    log.warning(
        "the budget changed on resume (%s -> %s): the learning rate continues from %.2e and %s (no new warm-up)",
        _describe_budget_dict(budget), _describe_budget(cfg.train), state.decay_from_lr, how,
    )  # fmt: skip


def _warn_changed(path: Path, started: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Warn, naming each key, when this resume's settings differ from the ones the run STARTED with."""
    before = flatten(started)
    after = flatten(to_dict(cfg))
    # A changed budget is a continuation, not a mistake: _rebase_schedule says what it does with it.
    ignored = {"train.out_dir", "train.max_steps", "train.max_tokens", "train.max_seconds"}
    keys = sorted(
        k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in ignored
    )
    if keys:
        log.warning(
            "resuming %s with settings that differ from the ones it was started with: %s (use --restart, or a "
            "new run directory, to start over with them)",
            path, "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys),
        )  # fmt: skip


def _describe_budget_dict(budget: dict[str, Any]) -> str:
    return _describe_budget(dataclasses.replace(TrainConfig(), **budget))


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


if (
    __name__ == "__main__"
):  # python -m lm.train: `lm train --local` without MLflow (the CLI lives in lm.__main__)
    from lm.__main__ import run_module

    raise SystemExit(run_module("train"))
