"""lm/train.py: the loop learns, accumulates, clips, decays, schedules and resumes bit for bit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from lm.checkpoint import CheckpointManager, load_checkpoint, read_metrics, read_run_record, run_lock
from lm.config import OptimConfig, load_config
from lm.data import prepare_data
from lm.evaluate import evaluate_split
from lm.model import TransformerLM
from lm.optim import param_groups
from lm.train import (
    Hooks,
    RunFinishedError,
    TrainError,
    WeightAverage,
    budget_progress,
    lr_at,
    preflight,
    train,
)


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


def rescored_dev_loss(path: Path, cfg, data, max_batches: int) -> float:
    """The dev loss of a saved checkpoint's weights, scored again outside the loop."""
    model = TransformerLM(cfg.model)
    model.load_state_dict(weights(path), strict=False)
    return evaluate_split(
        model, data.tokens("dev"), data.num_bytes("dev"), cfg.model.block_size, batch_size=32,
        max_batches=max_batches,
    ).loss  # fmt: skip


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
    # dev at every evaluation (the last one serves the end of the run too, once), val only at the end
    assert [(s, sorted(m)) for s, m in rec.evals] == [
        (20, ["dev_bpb", "dev_loss", "dev_ppl"]),
        (40, ["dev_bpb", "dev_loss", "dev_ppl"]),
        (60, ["dev_bpb", "dev_loss", "dev_ppl"]),
        (60, ["val_bpb", "val_loss", "val_ppl", "val_tokens"]),
    ]
    assert result.best_checkpoint is not None and (result.best_checkpoint / "model.safetensors").is_file()
    assert result.trained_steps == 60 and not result.interrupted


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


def test_muon_trains_and_its_learning_rate_follows_the_schedule_times_its_scale(toy_cfg, caplog) -> None:
    rec = Recorder()
    cfg = toy_cfg(train__max_steps=30, train__log_interval=1, optim__optimizer="muon", optim__muon_lr_scale=2.0,
                  optim__warmup_steps=5, optim__lr=3e-3, optim__schedule="constant")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lm.train"):
        result = train(cfg, hooks=rec)
    assert "tokens/step, Muon + AdamW, device cpu" in caplog.text
    losses = [m["train_loss"] for _, m in rec.logs]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert [m["lr"] for _, m in rec.logs][-1] == pytest.approx(3e-3)
    groups = load_checkpoint(result.last_checkpoint).trainer_state()["optimizer"]["muon"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(6e-3)  # the schedule's 3e-3 at optim.muon_lr_scale=2


def test_a_resume_trains_on_with_this_runs_optimizer_settings(toy_cfg) -> None:
    kw = dict(optim__optimizer="muon", optim__schedule="constant", optim__warmup_steps=0, optim__lr=1e-3)
    train(toy_cfg(train__max_steps=10, optim__muon_lr_scale=2.0, **kw))
    changed = toy_cfg(train__max_steps=12, optim__muon_lr_scale=4.0, optim__muon_momentum=0.9,
                      optim__weight_decay=0.2, optim__beta2=0.99, **kw)  # fmt: skip
    result = train(changed)
    assert result.resumed_from.name == "step-000010" and result.trained_steps == 2
    saved = load_checkpoint(result.last_checkpoint).trainer_state()["optimizer"]
    (muon,) = saved["muon"]["param_groups"]
    assert (muon["lr"], muon["lr_scale"], muon["momentum"], muon["weight_decay"]) == pytest.approx(
        (4e-3, 4, 0.9, 0.2)
    )
    assert all(tuple(g["betas"]) == (changed.optim.beta1, 0.99) for g in saved["adamw"]["param_groups"])
    assert len(saved["muon"]["state"]) == len(muon["params"])  # the momentum buffers came through the resume


def test_resuming_with_another_optimizer_is_refused_before_anything_is_written(toy_cfg) -> None:
    first = train(toy_cfg(train__max_steps=10))
    before = sorted(p.name for p in first.last_checkpoint.parent.iterdir())
    with pytest.raises(
        TrainError, match="trained with optim.optimizer=adamw, and this run asks for muon.*--restart"
    ):
        train(toy_cfg(train__max_steps=20, optim__optimizer="muon"))
    assert sorted(p.name for p in first.last_checkpoint.parent.iterdir()) == before
    restarted = train(toy_cfg(train__max_steps=20, optim__optimizer="muon"), resume=False)
    assert restarted.trained_steps == 20


@pytest.mark.parametrize("ema_decay, optimizer", [(0.0, "adamw"), (0.8, "adamw"), (0.8, "muon")])
def test_resume_after_a_crash_is_bit_identical(
    toy_cfg, tmp_path: Path, ema_decay: float, optimizer: str
) -> None:
    kw = dict(train__max_steps=20, train__checkpoint_interval=5, train__log_interval=1, model__dropout=0.1,
              optim__ema_decay=ema_decay, optim__optimizer=optimizer, optim__muon_lr_scale=2.0)  # fmt: skip
    straight = train(toy_cfg(train__out_dir=tmp_path / "straight", **kw), resume=False)
    cfg = toy_cfg(train__out_dir=tmp_path / "crashed", **kw)
    with pytest.raises(RuntimeError, match="simulated crash at step 12"):
        train(cfg, hooks=Recorder(crash_at=12))
    assert CheckpointManager(cfg.train.out_dir).latest().name == "step-000010"
    assert read_run_record(cfg.train.out_dir)["status"] == "failed"
    rec = Recorder()
    resumed = train(cfg, hooks=rec)
    assert resumed.resumed_from.name == "step-000010" and resumed.trained_steps == 10
    assert [s for s, _ in rec.logs] == list(range(11, 21))  # no step trained twice, none skipped
    a, b = weights(straight.last_checkpoint), weights(resumed.last_checkpoint)  # with ema_decay: the average
    if ema_decay:  # ...and the training weights a further resume would continue from
        a, b = ({**w, **{f"train.{k}": v for k, v in load_checkpoint(c).trainer_state()["train_weights"].items()}}
                for w, c in ((a, straight.last_checkpoint), (b, resumed.last_checkpoint)))  # fmt: skip
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.metrics["val_loss"] == resumed.metrics["val_loss"]


@pytest.mark.parametrize(
    "horizon, warming",
    [(0.1, lambda step: (1 + step) / (11 + step)), (0.25, lambda step: (1 + step) / (5 + step))],
)
def test_the_weight_average_folds_in_each_step_with_a_warming_up_decay(horizon, warming) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = WeightAverage(model, decay=0.3, horizon=horizon)
    expected = start
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step))
        ema.update(step)
        decay = min(0.3, warming(step))  # 2/12 (horizon 0.1) or 2/6 (0.25) at first, then the configured cap
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for average, want in zip(ema.model.parameters(), expected):
        torch.testing.assert_close(average, want)
        assert not average.requires_grad
    assert not any(torch.equal(a, p) for a, p in zip(ema.model.parameters(), model.parameters()))


def test_with_a_weight_average_the_checkpoints_hold_it_and_every_score_is_its_own(toy_cfg) -> None:
    cfg = toy_cfg(
        optim__ema_decay=0.9, train__max_steps=30, train__checkpoint_interval=10, train__keep_last=5
    )
    result = train(cfg)
    data = prepare_data(cfg, progress=False)
    last = load_checkpoint(result.last_checkpoint)
    trained = last.trainer_state()["train_weights"]
    assert any(
        not torch.equal(last.weights[k], trained[k]) for k in trained
    )  # the average is not the weights
    for path in [*sorted(Path(cfg.train.out_dir).glob("step-*")), result.best_checkpoint]:
        again = rescored_dev_loss(path, cfg, data, max_batches=4)
        assert read_metrics(path)["dev_loss"] == pytest.approx(again, rel=1e-6), path
    # the training weights score worse than their average here (decay 0.9 smooths the last ~10 steps)
    model = TransformerLM(cfg.model)
    model.load_state_dict(trained, strict=False)
    raw = evaluate_split(
        model, data.tokens("val"), data.num_bytes("val"), cfg.model.block_size, batch_size=32
    )
    assert result.metrics["val_loss"] != pytest.approx(raw.loss, rel=1e-6)
    # ...but it follows them: a loop that never updated it would score the initial weights' ln(vocab)
    assert abs(result.metrics["val_loss"] - raw.loss) < 0.25 < math.log(cfg.model.vocab_size) - raw.loss, (
        result.metrics["val_loss"],
        raw.loss,
    )
    plain = train(toy_cfg(train__max_steps=30, train__out_dir=Path(cfg.train.out_dir).parent / "plain"))
    assert load_checkpoint(plain.last_checkpoint).trainer_state()["train_weights"] is None


def test_the_run_averages_over_its_configured_horizon(toy_cfg, tmp_path: Path) -> None:
    def average(horizon: float) -> dict[str, torch.Tensor]:
        out = tmp_path / f"h{horizon}"
        cfg = toy_cfg(
            train__max_steps=8, optim__ema_decay=0.999, optim__ema_horizon=horizon, train__out_dir=out
        )
        return load_checkpoint(train(cfg).last_checkpoint).weights

    # the same training weights (same seed), averaged over the last tenth of the steps or over all of them
    short, long = average(0.1), average(1.0)
    assert all(torch.isfinite(v).all() for v in long.values())
    assert any(not torch.allclose(short[k], long[k]) for k in short)


def test_a_weight_average_switched_on_at_resume_starts_from_the_training_weights(toy_cfg) -> None:
    cfg = toy_cfg(train__max_steps=10)
    train(cfg)
    longer = toy_cfg(train__max_steps=12, optim__ema_decay=0.99)
    result = train(longer)
    assert result.resumed_from.name == "step-000010" and result.trained_steps == 2
    assert load_checkpoint(result.last_checkpoint).trainer_state()["train_weights"] is not None


@pytest.mark.parametrize(
    "optim, refused",
    [
        (
            ["optim.ema_decay=0.99"],
            r"optim.ema_decay=0.99 \(the weight average[^,]*\): set optim.ema_decay=0,",
        ),
        (
            ["optim.optimizer=muon"],
            r"optim.optimizer=muon \(Muon would orthogonalize each rank's shard[^,]*\): "
            r"set optim.optimizer=adamw,",
        ),
        (
            ["optim.ema_decay=0.9", "optim.optimizer=muon"],
            r"optim.ema_decay=0.9 \(.*\), optim.optimizer=muon .*: set optim.ema_decay=0 optim.optimizer=adamw,",
        ),
    ],
)
def test_what_fsdp_cannot_shard_is_refused_before_ray_starts(
    tmp_path: Path, optim: list[str], refused: str
) -> None:
    from lmplatform.config import load_platform_config

    from lm.config import ConfigError

    plain = ["ray.strategy=fsdp", "ray.num_workers=2", "optim.ema_decay=0", "optim.optimizer=adamw"]
    load_platform_config(None, plain, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"ray.strategy=fsdp does not support {refused}.*ray.strategy=ddp"):
        load_platform_config(None, [*plain, *optim], base_dir=tmp_path)


def test_out_of_range_optimizer_settings_name_the_key() -> None:
    from lm.config import ConfigError

    for key, bad, allowed in [
        ("ema_decay", -0.1, r"must be in \[0, 1\)"),
        ("ema_decay", 1.0, r"must be in \[0, 1\)"),
        ("ema_horizon", 0.0, r"must be in \(0, 1\]"),
        ("ema_horizon", 1.5, r"must be in \(0, 1\]"),
        ("muon_momentum", 1.0, r"must be in \[0, 1\)"),
        ("muon_lr_scale", 0.0, "must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=rf"optim.{key}.*{allowed}"):
            OptimConfig(**{key: bad}).validate()
    with pytest.raises(ConfigError, match="optim.optimizer.*adamw.*muon"):
        load_config(None, ["optim.optimizer=sgd"])


class StopAfter(Hooks):
    def __init__(self, steps: int) -> None:
        self.steps, self.limit = 0, steps

    def on_log(self, step: int, metrics: dict) -> None:
        self.steps = step

    def should_stop(self) -> bool:
        return self.steps >= self.limit


class FakeClock:
    """A clock that advances ``tick`` seconds each time it is read: time budgets without wall-clock noise."""

    def __init__(self, tick: float = 0.01) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_on_start_runs_once_before_the_clock_starts(toy_cfg) -> None:
    clock = FakeClock()

    class SlowStart(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.started: list[int] = []

        def on_start(self) -> None:
            self.started.append(len(self.logs))
            clock.now += 100.0  # set-up far longer than the whole budget must not be charged to it

    hooks = SlowStart()
    cfg = toy_cfg(train__max_seconds=1.0, train__max_steps=None, train__log_interval=1)
    result = train(cfg, hooks=hooks, clock=clock)
    assert hooks.started == [0]  # once, before the first step was logged
    assert result.step > 10 and 1.0 <= result.elapsed < 1.1, (result.step, result.elapsed)


def test_resuming_with_changed_settings_warns_naming_them(toy_cfg, caplog) -> None:
    cfg = toy_cfg(train__max_steps=12, train__checkpoint_interval=6, optim__lr=2e-3, train__log_interval=1)

    def changed() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "differ from the ones it was started" in r.getMessage()
        ]

    with caplog.at_level("WARNING", logger="lm.train"):
        first = toy_cfg(
            train__max_steps=12, train__checkpoint_interval=6, optim__lr=1e-3, train__log_interval=1
        )
        train(first, hooks=StopAfter(6))
        assert not changed()
        train(cfg, hooks=StopAfter(9))
    warned = changed()
    assert len(warned) == 1 and "optim.lr: 0.001 -> 0.002" in warned[0], warned
    assert "max_steps" not in warned[0] and "out_dir:" not in warned[0]  # only the changed key is named
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm.train"):
        train(cfg)  # the same settings as the last resume, but not as the start: still named
    assert len(changed()) == 1 and "optim.lr: 0.001 -> 0.002" in changed()[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm.train"):
        train(
            toy_cfg(train__max_steps=14, train__checkpoint_interval=6, optim__lr=1e-3, train__log_interval=1)
        )
    assert not changed()  # back to the starting lr; a larger budget is a continuation, said by its own line
    assert any(
        "the budget changed on resume (12 steps -> 14 steps)" in r.getMessage() for r in caplog.records
    )


def test_stop_then_resume_continues_to_the_budget(toy_cfg) -> None:
    class StopAt(Hooks):
        def __init__(self) -> None:
            self.steps = 0

        def on_log(self, step: int, metrics: dict) -> None:
            self.steps = step

        def should_stop(self) -> bool:
            return self.steps >= 10

    cfg = toy_cfg(train__max_steps=20, train__log_interval=1)
    stopped = train(cfg, hooks=StopAt())
    assert stopped.step == 10 and stopped.interrupted and "val_loss" not in stopped.metrics
    assert read_run_record(cfg.train.out_dir)["status"] == "interrupted"
    finished = train(cfg)
    assert finished.step == 20 and finished.trained_steps == 10 and not finished.interrupted
    record = read_run_record(cfg.train.out_dir)
    assert record["status"] == "finished" and record["run_id"] == finished.run_id == stopped.run_id
    # a finished run is never resumed as if new: it says so, with its number, and trains nothing
    with pytest.raises(RunFinishedError, match=r"finished at step 20 \(val perplexity [\d.]+\)") as info:
        train(cfg)
    assert info.value.step == 20 and info.value.metrics["val_ppl"] == pytest.approx(
        finished.metrics["val_ppl"]
    )


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


# --------------------------------------------------------------------------------------------------------------
# The run lifecycle: restart, best, budgets, interruptions, divergence


def test_restart_over_an_older_longer_run_keeps_nothing_of_it(toy_cfg) -> None:
    old = train(toy_cfg(train__max_steps=40, train__checkpoint_interval=10))
    cfg = toy_cfg(train__max_steps=25, train__checkpoint_interval=10)
    new = train(cfg, resume=False)
    out = Path(cfg.train.out_dir)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000020", "step-000025"]
    assert new.last_checkpoint is not None and new.last_checkpoint.is_dir()
    best = read_metrics(new.best_checkpoint)
    assert best["run_id"] == new.run_id != old.run_id and best["step"] <= 25
    assert read_run_record(out)["run_id"] == new.run_id


def test_every_checkpoint_competing_for_best_is_scored_on_the_same_dev_tokens(toy_cfg) -> None:
    cfg = toy_cfg(
        train__max_steps=30, train__checkpoint_interval=10, train__keep_last=5, train__eval_max_batches=2
    )
    result = train(cfg)
    data = prepare_data(cfg, progress=False)
    scores = {}
    for path in sorted(Path(cfg.train.out_dir).glob("step-*")):
        saved = read_metrics(path)
        again = rescored_dev_loss(path, cfg, data, max_batches=2)
        assert saved["dev_loss"] == pytest.approx(again, rel=1e-6), path  # same tokens, final one included
        scores[saved["step"]] = saved["dev_loss"]
    best = read_metrics(result.best_checkpoint)
    assert best["dev_loss"] == min(scores.values()) and "val_loss" in best  # best carries the reported number


def test_an_evaluation_serving_eval_and_checkpoint_runs_once(
    toy_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lm.train as lm_train

    calls: list[str] = []
    real = lm_train.evaluate_split

    def counting(*args, **kwargs):
        calls.append(kwargs["text_name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_train, "evaluate_split", counting)
    rec = Recorder()
    train(toy_cfg(train__max_steps=20, train__eval_interval=10, train__checkpoint_interval=10), hooks=rec)
    assert calls == ["dev", "dev", "val"]  # step 10, step 20 (also the end's), val at the end
    # the last step is checkpointed once, by the end of the run
    assert [s for s, _ in rec.evals] == [10, 20, 20] and [s for s, _ in rec.checkpoints] == [10, 20]


def test_a_time_budget_resume_trains_the_same_total(toy_cfg, tmp_path: Path) -> None:
    kw = dict(
        train__max_steps=None, train__max_seconds=3.0, train__checkpoint_interval=20, train__log_interval=5
    )
    straight = train(toy_cfg(train__out_dir=tmp_path / "straight", **kw), clock=FakeClock())
    cfg = toy_cfg(train__out_dir=tmp_path / "halves", **kw)
    first = train(cfg, hooks=StopAfter(straight.step // 2), clock=FakeClock())
    assert first.interrupted
    second = train(cfg, clock=FakeClock())
    assert second.resumed_from is not None
    assert abs(second.step - straight.step) <= 0.03 * straight.step, (straight.step, first.step, second.step)
    assert second.elapsed == pytest.approx(straight.elapsed, abs=0.05)


def test_an_extended_budget_continues_without_a_jump_in_the_learning_rate(toy_cfg, caplog) -> None:
    kw = dict(train__log_interval=1, optim__warmup_steps=5, optim__schedule="cosine")
    first = train(toy_cfg(train__max_steps=20, **kw))
    last_lr = [h["lr"] for h in first.history if "lr" in h][-1]
    with caplog.at_level("WARNING", logger="lm.train"):
        more = train(toy_cfg(train__max_steps=30, **kw))
    assert more.step == 30 and more.trained_steps == 10
    lrs = [h["lr"] for h in more.history if "lr" in h]
    assert lrs[0] <= last_lr * 1.0001 and all(
        b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])
    )  # decays on, never up
    assert any(
        "the budget changed on resume (20 steps -> 30 steps)" in r.getMessage() for r in caplog.records
    )


def test_a_non_finite_loss_stops_the_run_naming_the_step(toy_cfg) -> None:
    cfg = toy_cfg(train__max_steps=200, optim__lr=1e6, optim__warmup_steps=0, optim__grad_clip=None,
                  optim__weight_decay=0.0, train__checkpoint_interval=1)  # fmt: skip
    with pytest.raises(TrainError, match=r"step \d+: the loss is (nan|inf).*training diverged"):
        train(cfg)
    for path in Path(cfg.train.out_dir).glob("step-*"):  # nothing non-finite was written
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path).weights.values()), path


def test_compilation_happens_before_the_clock_starts(
    toy_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_compile(module):  # stands in for torch.compile: the first call is where compilation happens
        def forward(*args, **kwargs):
            calls.append("forward")
            return module(*args, **kwargs)

        return forward

    class Watch(Hooks):
        def on_start(self) -> None:
            calls.append("clock starts")

    monkeypatch.setattr(torch, "compile", fake_compile)
    kw = dict(train__max_steps=6, model__dropout=0.1)
    compiled = train(toy_cfg(train__compile=True, train__out_dir=tmp_path / "c", **kw), hooks=Watch())
    plain = train(toy_cfg(train__out_dir=tmp_path / "p", **kw))
    assert calls[:2] == ["forward", "clock starts"]
    a, b = weights(compiled.last_checkpoint), weights(plain.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the warm-up consumed no data and no randomness


def test_a_second_writer_on_the_same_run_directory_fails_at_once(toy_cfg) -> None:
    cfg = toy_cfg()
    with run_lock(cfg.train.out_dir):
        with pytest.raises(Exception, match="is in use by another `lm train`"):
            train(cfg)


def test_resume_refuses_another_model_shape_naming_only_what_differs(toy_cfg) -> None:
    train(toy_cfg(train__max_steps=6), hooks=StopAfter(5))
    with pytest.raises(
        TrainError, match=r"model shape differs \(model.n_layer: 2 -> 3\); use --restart"
    ) as info:
        train(toy_cfg(train__max_steps=6, model__n_layer=3))
    assert "ModelConfig(" not in str(info.value)


def test_resume_refuses_a_checkpoint_whose_tokenizer_differs(toy_cfg, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 300)
    kw = dict(data__corpus=corpus, data__cache_dir=tmp_path / "cache", train__max_steps=6)
    train(toy_cfg(**kw), hooks=StopAfter(5))
    corpus.write_text("Now is the winter of our discontent made glorious summer. " * 300)  # edited in place
    with pytest.raises(TrainError, match="its tokenizer differs from the prepared data's"):
        train(toy_cfg(**kw))
    with pytest.raises(TrainError, match="its tokenizer differs"):
        preflight(toy_cfg(**kw), data=prepare_data(toy_cfg(**kw), progress=False))
    assert train(toy_cfg(**kw), resume=False).step == 6  # --restart trains on the new text


STOP_SCRIPT = """
import sys
from lm.config import load_config
from lm.train import Hooks, train

class Started(Hooks):
    def on_log(self, step, metrics):
        if step == 5:
            print("training", flush=True)

result = train(load_config(None, sys.argv[1:]), hooks=Started())
print("interrupted" if result.interrupted else "finished", result.step, result.last_checkpoint, flush=True)
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_at_a_step_boundary_and_returns(toy_args, tmp_path: Path, signum: str) -> None:
    import signal
    import subprocess
    import sys

    # a constant LR after warmup, so a run of exactly the stopped step count follows the same schedule
    args = toy_args(
        train__max_steps=1_000_000, train__log_interval=1, optim__warmup_steps=5, optim__schedule="constant"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(getattr(signal, signum))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    status, step, path = out.split()
    assert status == "interrupted" and f"{signum}: finishing this step" in err
    state = load_checkpoint(path).trainer_state()
    assert state["step"] == int(step) and Path(path).name == f"step-{int(step):06d}"
    same = train(load_config(None, [*args, f"train.max_steps={step}", f"train.out_dir={tmp_path / 'same'}"]))
    assert state["sampler"] == load_checkpoint(same.last_checkpoint).trainer_state()["sampler"]
    assert torch.equal(weights(Path(path))["tok_emb.weight"], weights(same.last_checkpoint)["tok_emb.weight"])
    out_dir = Path(path).parent
    assert read_run_record(out_dir)["status"] == "interrupted"
    assert read_metrics(path)["step"] == int(step) and "dev_loss" in read_metrics(path)
