"""lm/train.py: the loop learns, accumulates, clips, decays, schedules and resumes bit for bit."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from lm.checkpoint import CheckpointManager, load_checkpoint
from lm.config import OptimConfig, load_config
from lm.model import TransformerLM
from lm.train import Hooks, budget_progress, lr_at, param_groups, train


class Recorder(Hooks):
    """Collects what the loop reports; optionally crashes at a step (a simulated kill)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.evals: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, Path | None]] = []
        self.crash_at = crash_at

    def on_log(self, step: int, metrics: dict) -> None:
        self.logs.append((step, metrics))
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))

    def on_checkpoint(self, step: int, metrics: dict, path: Path | None) -> None:
        self.checkpoints.append((step, path))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).weights


def test_loss_goes_down_and_reports_are_complete(toy_cfg) -> None:
    cfg = toy_cfg(train__max_steps=60, train__eval_interval=20)
    rec = Recorder()
    result = train(cfg, hooks=rec)
    assert result.step == 60
    assert [s for s, _ in rec.logs] == list(range(5, 61, 5))
    first, last = rec.logs[0][1]["train_loss"], rec.logs[-1][1]["train_loss"]
    assert last < first - 0.5, (first, last)
    assert result.metrics["val_loss"] < math.log(320) - 0.5
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]))
    assert 0 < result.metrics["val_bpb"] < 8
    assert [s for s, _ in rec.evals] == [20, 40, 60, 60]  # three periodic + the final full evaluation
    assert result.best_checkpoint is not None and (result.best_checkpoint / "model.safetensors").is_file()


def test_a_model_overfits_a_short_text(toy_cfg, tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 200)
    cfg = toy_cfg(
        data__corpus=corpus,
        optim__lr=1e-2,
        optim__warmup_steps=50,
        train__max_steps=400,
        model__vocab_size=300,
    )
    result = train(cfg)
    assert result.metrics["val_loss"] < 0.3


def test_gradient_accumulation_equals_one_bigger_batch(toy_cfg, tmp_path: Path) -> None:
    # Adam's first moment after one step is (1 - beta1) * grad: compare it between the two runs.
    common = dict(train__max_steps=1, optim__warmup_steps=0, optim__grad_clip=None, optim__weight_decay=0.0)
    a = train(
        toy_cfg(train__batch_size=8, train__grad_accum_steps=1, train__out_dir=tmp_path / "a", **common)
    )
    b = train(
        toy_cfg(train__batch_size=4, train__grad_accum_steps=2, train__out_dir=tmp_path / "b", **common)
    )
    state_a = load_checkpoint(a.last_checkpoint).trainer_state()["optimizer"]["state"]
    state_b = load_checkpoint(b.last_checkpoint).trainer_state()["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key]["exp_avg"], state_b[key]["exp_avg"], rtol=1e-4, atol=1e-8)


def test_clipping_bounds_the_global_gradient_norm(toy_cfg) -> None:
    cfg = toy_cfg(train__max_steps=1, optim__warmup_steps=0, optim__grad_clip=1e-3, train__log_interval=1)
    rec = Recorder()
    result = train(cfg, hooks=rec)
    assert rec.logs[0][1]["grad_norm"] > 1e-3  # the norm before clipping is reported
    state = load_checkpoint(result.last_checkpoint).trainer_state()["optimizer"]["state"]
    clipped = torch.sqrt(sum((s["exp_avg"] / 0.1).pow(2).sum() for s in state.values()))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_lr_schedule_values_at_known_steps() -> None:
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    max_steps = 110

    def at(step: int) -> float:
        return lr_at(opt, step, step / max_steps, 10 / max_steps)

    assert at(0) == pytest.approx(0.1)
    assert at(4) == pytest.approx(0.5)
    assert at(10) == pytest.approx(1.0)
    assert at(60) == pytest.approx(0.55)  # halfway through the decay: min + (max - min) / 2
    assert at(110) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(lin, 50, 0.5, 0.0) == pytest.approx(0.5)
    const = OptimConfig(lr=0.3, min_lr=0.0, warmup_steps=0, schedule="constant")
    assert lr_at(const, 99, 0.99, 0.0) == pytest.approx(0.3)


def test_budget_progress_is_the_furthest_budget() -> None:
    cfg = load_config(None, ["train.max_steps=100", "train.max_seconds=10", "train.max_tokens=1000"])
    assert budget_progress(cfg.train, 50, 100, 2.0) == pytest.approx(0.5)
    assert budget_progress(cfg.train, 10, 900, 2.0) == pytest.approx(0.9)
    assert budget_progress(cfg.train, 10, 100, 10.0) == pytest.approx(1.0)


def test_weight_decay_only_on_weight_matrices() -> None:
    cfg = load_config(None, ["model.vocab_size=300", "model.n_embd=32", "model.n_head=2"])
    model = TransformerLM(cfg.model)
    decay, no_decay = param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert "tok_emb.weight" in plain
    assert all(n.endswith("weight") for n in decayed) and not any("ln" in n or "emb" in n for n in decayed)
    assert any(n.endswith("bias") for n in plain) and any("ln" in n for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    with_emb = param_groups(model, OptimConfig(decay_embeddings=True))[0]["params"]
    assert any(p is model.tok_emb.weight for p in with_emb)


def test_resume_after_a_crash_is_bit_identical(toy_cfg, tmp_path: Path) -> None:
    kw = dict(train__max_steps=20, train__checkpoint_interval=5, train__log_interval=1, model__dropout=0.1)
    straight = train(toy_cfg(train__out_dir=tmp_path / "straight", **kw), resume=False)
    cfg = toy_cfg(train__out_dir=tmp_path / "crashed", **kw)
    with pytest.raises(RuntimeError, match="simulated crash at step 12"):
        train(cfg, hooks=Recorder(crash_at=12))
    assert CheckpointManager(cfg.train.out_dir).latest().name == "step-000010"
    rec = Recorder()
    resumed = train(cfg, hooks=rec)
    assert resumed.resumed_from.name == "step-000010"
    assert [s for s, _ in rec.logs] == list(range(11, 21))  # no step trained twice, none skipped
    a, b = weights(straight.last_checkpoint), weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class StopAfter(Hooks):
    def __init__(self, steps: int) -> None:
        self.steps, self.limit = 0, steps

    def on_log(self, step: int, metrics: dict) -> None:
        self.steps = step

    def should_stop(self) -> bool:
        return self.steps >= self.limit


def test_on_start_runs_once_before_the_clock_starts(toy_cfg) -> None:
    class SlowStart(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.started: list[int] = []

        def on_start(self) -> None:
            self.started.append(len(self.logs))
            time.sleep(1.5)  # longer than the whole budget: set-up work must not be charged to it

    hooks = SlowStart()
    result = train(toy_cfg(train__max_seconds=1.0, train__max_steps=None, train__log_interval=1), hooks=hooks)
    assert hooks.started == [0]  # once, before the first step was logged
    assert result.step > 0 and 1.0 <= result.elapsed < 1.5, (result.step, result.elapsed)


def test_resuming_with_changed_settings_warns_naming_them(toy_cfg, caplog) -> None:
    cfg = toy_cfg(train__max_steps=12, train__checkpoint_interval=6, optim__lr=2e-3)
    with caplog.at_level("WARNING", logger="lm.train"):
        train(toy_cfg(train__max_steps=12, train__checkpoint_interval=6, optim__lr=1e-3), hooks=StopAfter(6))
        train(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "optim.lr: 0.001 -> 0.002" in warned[0], warned
    assert "max_steps" not in warned[0] and "out_dir:" not in warned[0]  # only the changed key is named
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm.train"):
        train(cfg)  # the same settings again: silent
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_stop_then_resume_continues_to_the_budget(toy_cfg) -> None:
    class StopAt(Hooks):
        def __init__(self) -> None:
            self.steps = 0

        def on_log(self, step: int, metrics: dict) -> None:
            self.steps = step

        def should_stop(self) -> bool:
            return self.steps >= 10

    cfg = toy_cfg(train__max_steps=20, train__log_interval=1)
    assert train(cfg, hooks=StopAt()).step == 10
    assert train(cfg).step == 20
    assert train(cfg).step == 20  # a finished run resumes to its end and stops at once


def test_amp_auto_is_bf16_on_a_cpu_only_when_it_has_native_bf16(monkeypatch) -> None:
    import lm.train as lm_train

    cpu = torch.device("cpu")
    monkeypatch.setattr(lm_train, "cpu_has_native_bf16", lambda: True)
    assert lm_train.resolve_amp("auto", cpu) is torch.bfloat16
    assert lm_train.resolve_amp("off", cpu) is None
    monkeypatch.setattr(lm_train, "cpu_has_native_bf16", lambda: False)
    assert lm_train.resolve_amp("auto", cpu) is None
    assert lm_train.resolve_amp("bf16", cpu) is torch.bfloat16  # asked for explicitly: emulated, but allowed
    assert lm_train.resolve_amp("auto", torch.device("mps")) is None
    with pytest.raises(lm_train.TrainError, match="train.amp=fp16 needs a CUDA device"):
        lm_train.resolve_amp("fp16", cpu)


def test_bf16_autocast_trains_on_cpu(toy_cfg) -> None:
    rec = Recorder()
    result = train(toy_cfg(train__amp="bf16", train__max_steps=40), hooks=rec)
    first, last = rec.logs[0][1]["train_loss"], rec.logs[-1][1]["train_loss"]
    assert math.isfinite(result.metrics["val_loss"]) and last < first - 0.3, (first, last)
