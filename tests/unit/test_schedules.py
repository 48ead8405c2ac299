"""lm/train.py's learning-rate schedules: cosine, linear, constant and wsd (warmup-stable-decay), over step, token
and time budgets, across a changed budget on resume, and a bit-identical resume in the middle of the decay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

# the loop's test helpers: a clock that ticks per read, a stop after N steps, a crash at a step
from test_train import FakeClock, Recorder, StopAfter

from lm.checkpoint import load_checkpoint
from lm.config import ConfigError, OptimConfig, load_config
from lm.train import lr_at, train

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def schedule(name: str, max_steps: int = 100, warmup: int = 10, **kw: float) -> list[float]:
    """The LR of every step of a step-budget run, computed the way the loop does."""
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=warmup, schedule=name, **kw)
    return [lr_at(opt, s, s / max_steps, warmup / max_steps) for s in range(max_steps)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_warms_up_linearly_to_the_peak(name: str) -> None:
    lrs = schedule(name)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)  # the first step after warmup runs at the peak
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never back up after it


def test_cosine_linear_and_constant_at_key_points() -> None:
    cos, lin, const = schedule("cosine"), schedule("linear"), schedule("constant")
    # halfway through the decay (step 55 of 10..100): cosine and linear both at the middle of [min_lr, lr]
    assert cos[55] == pytest.approx(0.55) and lin[55] == pytest.approx(0.55)
    assert cos[32] > lin[32]  # cosine stays high longer...
    assert cos[78] < lin[78]  # ...and falls faster late
    assert lin[99] == pytest.approx(1.0 - 0.9 * 89 / 90)  # one step short of min_lr at the last step
    assert const[10:] == pytest.approx([1.0] * 90)
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(opt, 100, 1.0, 0.1) == pytest.approx(0.1)  # the end of the budget is min_lr


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fifth() -> None:
    lrs = schedule("wsd")  # decay_fraction defaults to 0.2
    assert OptimConfig().decay_fraction == 0.2
    assert lrs[10:80] == pytest.approx([1.0] * 70)  # stable until 80% of the budget
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.55)  # half way down at 90%
    assert lrs[99] == pytest.approx(1.0 - 0.9 * 19 / 20)
    decay = [a - b for a, b in zip(lrs[80:], lrs[81:])]
    assert decay == pytest.approx([0.9 / 20] * 19)  # linear: equal steps down
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd")
    assert lr_at(opt, 100, 1.0, 0.1) == pytest.approx(0.1)


def test_wsd_decay_fraction_sets_where_the_decay_starts() -> None:
    lrs = schedule("wsd", decay_fraction=0.5)
    assert lrs[49] == pytest.approx(1.0) and lrs[50] == pytest.approx(1.0) and lrs[51] < 1.0
    # decaying over the whole budget is the linear schedule
    assert schedule("wsd", decay_fraction=1.0) == pytest.approx(schedule("linear"))
    # a warmup longer than the stable phase: the decay starts when warmup ends, from the peak
    long = schedule("wsd", warmup=90, decay_fraction=0.2)
    assert long[90] == pytest.approx(1.0) and long[99] == pytest.approx(1.0 - 0.9 * 9 / 10)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_decay_fraction_outside_0_1_is_a_config_error(value: float) -> None:
    with pytest.raises(
        ConfigError, match=rf"optim\.decay_fraction={value!r} is not allowed: must be in \(0, 1\]"
    ):
        load_config(None, [f"optim.decay_fraction={value}"])


def test_an_unknown_schedule_names_wsd_among_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"optim\.schedule='step' .* one of cosine, linear, constant, wsd"):
        load_config(None, ["optim.schedule=step"])
    assert load_config(None, ["optim.schedule=wsd", "optim.decay_fraction=0.3"]).optim.decay_fraction == 0.3


# --------------------------------------------------------------------------------------------------------------
# Through the loop: token and time budgets, resume


def lrs_of(result) -> list[tuple[float, float]]:
    """(progress, lr) of every logged step."""
    return [(h["progress"], h["lr"]) for h in result.history if "lr" in h]


@pytest.mark.parametrize(
    "budget",
    [
        {"train__max_steps": 40},
        {"train__max_steps": None, "train__max_tokens": 40 * 8 * 32},  # 8 x 32 tokens per step
        {"train__max_steps": None, "train__max_seconds": 1.0},
    ],
    ids=["steps", "tokens", "seconds"],
)
def test_wsd_follows_the_budget_whatever_its_unit(toy_cfg, budget: dict) -> None:
    peak, low = 3e-3, 3e-4
    cfg = toy_cfg(optim__schedule="wsd", optim__decay_fraction=0.25, optim__min_lr=low, train__log_interval=1,
                  optim__warmup_steps=5, **budget)  # fmt: skip
    points = lrs_of(train(cfg, clock=FakeClock()))[5:]  # after warmup
    assert len(points) >= 30
    # A step's LR comes from the progress just before it; its log line has the progress just after it.
    width = max(b[0] - a[0] for a, b in zip(points, points[1:]))
    for p, lr in points:
        expected = peak - (peak - low) * min(max((p - 0.75) / 0.25, 0.0), 1.0)
        assert abs(lr - expected) <= (peak - low) * width / 0.25 + 1e-12, (p, lr, expected)
    assert sum(lr == peak for _, lr in points) >= 0.6 * len(points)  # the stable phase: the peak, exactly
    assert points[-1][1] < low + (peak - low) * 2 * width / 0.25  # ends at min_lr, give or take one step


def test_a_longer_budget_on_resume_extends_the_wsd_stable_phase(toy_cfg, caplog) -> None:
    kw = dict(optim__schedule="wsd", optim__warmup_steps=2, train__log_interval=1, optim__min_lr=3e-4)
    assert train(toy_cfg(train__max_steps=20, **kw), hooks=StopAfter(10)).interrupted  # stopped while stable
    with caplog.at_level("WARNING", logger="lm.train"):
        more = train(toy_cfg(train__max_steps=40, **kw))
    assert (
        "continues from 3.00e-03 and holds it until the last 0.2 of the new budget, then decays"
        in caplog.text
    )
    lrs = [lr for _, lr in lrs_of(more)]  # steps 11..40
    # stable up to 80% of the NEW budget (step 32 computes its LR at progress 0.8), not of the old one (16)
    assert lrs[:23] == [3e-3] * 23
    assert lrs[23] < 3e-3 and lrs[-1] == pytest.approx(3e-3 - 2.7e-3 * 7 / 8)


def test_a_finished_wsd_run_given_more_budget_never_climbs_back(toy_cfg) -> None:
    kw = dict(optim__schedule="wsd", optim__warmup_steps=2, train__log_interval=1)
    before = [lr for _, lr in lrs_of(train(toy_cfg(train__max_steps=20, **kw)))]
    more = train(toy_cfg(train__max_steps=40, **kw))
    lrs = [lr for _, lr in lrs_of(more)]
    assert more.trained_steps == 20 and lrs[0] <= before[-1]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # no jump back up towards the peak


def test_a_crash_in_the_wsd_decay_resumes_bit_identically(toy_cfg, tmp_path: Path) -> None:
    kw = dict(optim__schedule="wsd", optim__decay_fraction=0.5, train__max_steps=20, train__checkpoint_interval=6,
              train__log_interval=1, model__dropout=0.1)  # fmt: skip
    straight = train(toy_cfg(train__out_dir=tmp_path / "straight", **kw))
    cfg = toy_cfg(train__out_dir=tmp_path / "crashed", **kw)
    with pytest.raises(RuntimeError, match="simulated crash at step 15"):
        train(
            cfg, hooks=Recorder(crash_at=15)
        )  # last checkpoint at step 12: inside the decay (it starts at step 10)
    resumed = train(cfg)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-000012"
    assert [lr for _, lr in lrs_of(resumed)] == [lr for _, lr in lrs_of(straight)][12:]
    a = load_checkpoint(straight.last_checkpoint).weights
    b = load_checkpoint(resumed.last_checkpoint).weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isclose(resumed.metrics["val_loss"], straight.metrics["val_loss"], rel_tol=0, abs_tol=0)
