"""The sweeps we ship (experiments/sweep*.yaml, scaling.yaml) load, pass the space checks, and search what
issue 11 asks of them: every trial's shape is built and counted here, nothing is trained."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from lmplatform.sizes import count_params
from lmplatform.tune import load_sweep

REPO = Path(__file__).resolve().parents[2]


def trial_configs(name: str, **fixed: object) -> list:
    """Every grid combination (choices and ranges pinned by ``fixed``, else their first candidate)."""
    sweep = load_sweep(REPO / "experiments" / name, base_dir=REPO)
    axes = [
        [(d.key, fixed[d.key])] if d.key in fixed else [(d.key, v) for v in d.candidates()]
        for d in sweep.dims
    ]
    return sweep, [sweep.config(dict(combo)) for combo in itertools.product(*axes)]


def test_make_sweep_crosses_sizes_0_3m_to_3m_with_four_schedules_and_fits_20_minutes() -> None:
    sweep, configs = trial_configs("sweep.yaml")
    assert len(configs) == 3 * 4 * 2
    sizes = sorted({count_params(c.model) for c in configs})
    assert 0.29e6 <= sizes[0] <= 0.31e6 and 2.94e6 <= sizes[-1] <= 3.06e6 and len(sizes) == 3
    assert {c.optim.schedule for c in configs} == {"cosine", "linear", "constant", "wsd"}
    assert len({c.optim.lr for c in configs}) >= 2
    tc = sweep.pcfg.tune
    assert tc.max_concurrent_trials == 1 and tc.scheduler == "asha" and sweep.pcfg.ray.num_workers == 0
    seconds = {c.train.max_seconds for c in configs}
    # the worst case (no trial stopped early) with 15 s per trial to start and score it stays under 20 minutes
    assert len(configs) * (max(seconds) + 15) <= 20 * 60
    assert all(c.optim.warmup_steps <= 100 for c in configs)  # a 3M model makes ~100 steps in 30 s


def test_sweep_tiny_searches_regularization_shape_and_schedule_at_the_tiny_size() -> None:
    sweep = load_sweep(
        REPO / "experiments" / "sweep-tiny.yaml", base_dir=REPO
    )  # 2,880 grid corners: not built
    keys = set(sweep.keys)
    assert {"model.dropout", "optim.weight_decay", "optim.decay_embeddings", "model.n_layer", "model.n_head",
            "optim.schedule", "optim.lr"} <= keys  # fmt: skip
    first = {d.key: d.candidates()[0] for d in sweep.dims}
    for n_layer, n_head in itertools.product([1, 2, 3, 4], [2, 4, 8]):
        cfg = sweep.config(first | {"model.n_layer": n_layer, "model.n_head": n_head})
        assert abs(count_params(cfg.model) - 658_944) <= 0.02 * 658_944, (n_layer, n_head)
        assert cfg.model.vocab_size == 2048
        # A step budget (what the tiny preset reaches in make train's 120 s) ranks alike on a busy machine
        assert cfg.train.max_steps == 1400 and cfg.train.max_seconds is None
        assert cfg.data.corpus == "tinyshakespeare"


def test_scaling_study_is_three_budgets_by_five_sizes_on_the_complete_works() -> None:
    sweep, configs = trial_configs("scaling.yaml")
    assert sweep.pcfg.tune.study == "scaling" and sweep.pcfg.tune.scheduler == "fifo"
    budgets = sorted({c.train.max_seconds for c in configs})
    assert budgets == [30, 60, 120]
    for seconds in budgets:
        sizes = sorted(count_params(c.model) for c in configs if c.train.max_seconds == seconds)
        assert len(sizes) == 5 and sizes[-1] / sizes[0] >= 10  # a wide enough range to bracket an optimum
    assert all(c.data.corpus == "shakespeare-complete" for c in configs)
    assert all(c.train.eval_interval == 0 for c in configs)  # the whole budget trains


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep-tiny.yaml", "scaling.yaml"])
def test_each_sweep_has_its_own_name_and_directory(name: str) -> None:
    sweep = load_sweep(REPO / "experiments" / name, base_dir=REPO)
    assert sweep.name == name.removesuffix(".yaml") and Path(sweep.path) == REPO / "runs" / sweep.name
