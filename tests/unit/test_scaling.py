"""lmplatform/scaling.py on synthetic studies with a known optimum: parabolas, bands, the power law, and the
degenerate cases (too few sizes, no minimum, an optimum at the edge) said in words."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from lmplatform.scaling import (
    ScalingError,
    analyze,
    describe_size_for,
    fit_parabola,
    fit_power_law,
    report,
    size_for_minutes,
)

A_TRUE, B_TRUE = 2e4, 0.5  # N_opt = 20,000 * seconds^0.5: 155K at 60 s, 219K at 120 s, 310K at 240 s


def n_opt(seconds: float) -> float:
    return A_TRUE * seconds**B_TRUE


def curve(n: float, seconds: float) -> float:
    """A synthetic iso-time curve: a parabola in ln(params), lowest at n_opt(seconds)."""
    return 1.8 - 0.002 * math.log(seconds) + 0.05 * (math.log(n) - math.log(n_opt(seconds))) ** 2


def study_trials(
    budgets=(60, 120, 240), seeds: int = 2, noise: float = 0.003, spread: float = 4.0, rng_seed: int = 1
) -> list[dict]:
    rng = np.random.default_rng(rng_seed)
    trials = []
    for seconds in budgets:
        for n in np.geomspace(n_opt(seconds) / spread, n_opt(seconds) * spread, 5):
            for seed in range(seeds):
                trials.append({
                    "trial_id": f"t{len(trials)}", "status": "TERMINATED", "n_params": int(n),
                    "params": {"train.max_seconds": seconds, "model.params": int(n), "train.seed": seed},
                    "dev_bpb": curve(n, seconds) + rng.normal(0, noise), "val_bpb": 2.0,
                })  # fmt: skip
    return trials


def test_fit_parabola_recovers_a_noiseless_parabola_exactly() -> None:
    x = np.log(np.geomspace(1e5, 1e6, 5))
    y = 0.05 * (x - math.log(3e5)) ** 2 + 1.8
    (c2, c1, c0), optimum, band = fit_parabola(x, y)
    assert c2 == pytest.approx(0.05) and optimum == pytest.approx(math.log(3e5), abs=1e-9)
    assert np.polyval([c2, c1, c0], math.log(3e5)) == pytest.approx(1.8)
    assert band[0] == pytest.approx(optimum, abs=1e-6) and band[1] == pytest.approx(optimum, abs=1e-6)


def test_three_points_fit_exactly_and_leave_no_band() -> None:
    x = np.log([1e5, 3e5, 1e6])
    _, optimum, band = fit_parabola(x, 0.05 * (x - math.log(3e5)) ** 2 + 1.8)
    assert optimum == pytest.approx(math.log(3e5)) and all(math.isnan(b) for b in band)


def test_the_band_contains_the_true_optimum_most_of_the_time() -> None:
    truth = math.log(3e5)
    x = np.repeat(np.log(np.geomspace(1e5, 1e6, 5)), 2)  # five sizes, two seeds each
    hits, widths = 0, []
    for seed in range(40):
        y = 0.05 * (x - truth) ** 2 + 1.8 + np.random.default_rng(seed).normal(0, 0.004, x.size)
        _, optimum, (lo, hi) = fit_parabola(x, y, seed=seed)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    assert hits >= 32, hits  # a 90% band: about 36 of 40, and never a point estimate only
    assert min(widths) > 0


def test_a_band_widens_with_noise() -> None:
    x = np.repeat(np.log(np.geomspace(1e5, 1e6, 5)), 2)
    y = 0.05 * (x - math.log(3e5)) ** 2 + 1.8
    noise = np.random.default_rng(0).normal(0, 1, x.size)
    width = [np.subtract(*fit_parabola(x, y + s * noise)[2][::-1]) for s in (0.001, 0.01)]
    assert width[1] > 3 * width[0]


@pytest.mark.parametrize(
    ("sizes", "match"),
    [([1e5, 1e5, 3e5, 3e5], r"at least 3 different sizes, got 2 \(100K, 300K\)"), ([], r"got 0 \(none\)")],
)
def test_fewer_than_three_sizes_is_a_clear_error(sizes: list[float], match: str) -> None:
    with pytest.raises(ScalingError, match=match):
        fit_parabola(np.log(sizes), np.ones(len(sizes)))


def test_a_curve_without_a_minimum_is_a_clear_error() -> None:
    x = np.log(np.geomspace(1e5, 1e6, 5))
    with pytest.raises(ScalingError, match="does not curve up around any size"):
        fit_parabola(x, -((x - 12.5) ** 2))


def test_fit_power_law_recovers_exponent_and_prefactor() -> None:
    budgets = np.array([60.0, 120.0, 240.0, 480.0])
    a, b, band = fit_power_law(budgets, A_TRUE * budgets**B_TRUE)
    assert a == pytest.approx(A_TRUE, rel=1e-9) and b == pytest.approx(B_TRUE, abs=1e-12)
    assert band[0] == pytest.approx(B_TRUE, abs=1e-9) and band[1] == pytest.approx(B_TRUE, abs=1e-9)
    _, _, two = fit_power_law(budgets[:2], A_TRUE * budgets[:2] ** B_TRUE)
    assert all(math.isnan(v) for v in two)  # two budgets: a line through them, no residuals to say more
    with pytest.raises(ScalingError, match="2 or more different budgets, got 1"):
        fit_power_law([60.0, 60.0], [1e5, 2e5])


def test_a_study_recovers_each_budgets_optimum_and_the_power_law() -> None:
    study = analyze(study_trials())
    assert [e["budget"] for e in study["budgets"]] == [60.0, 120.0, 240.0]
    for e in study["budgets"]:
        lo, hi = e["band_params"]
        assert lo <= n_opt(e["budget"]) <= hi, e
        assert e["optimum_params"] == pytest.approx(n_opt(e["budget"]), rel=0.05)
        assert e["edge"] is None and e["seed_spread_bpb"] > 0
    law = study["power_law"]
    assert law["b"] == pytest.approx(B_TRUE, abs=0.05)
    assert law["b_band"][0] <= B_TRUE <= law["b_band"][1]
    n, (lo, hi) = size_for_minutes(study, 3)
    assert lo <= n_opt(180) <= hi and n == pytest.approx(n_opt(180), rel=0.05)


def test_size_for_minutes_says_when_it_extrapolates() -> None:
    study = analyze(study_trials())
    assert "extrapolated beyond the budgets measured (1 min .. 4 min)" in describe_size_for(study, 30)
    assert "extrapolated" not in describe_size_for(study, 2)
    with pytest.raises(ScalingError, match="positive number of minutes"):
        size_for_minutes(study, 0)


def test_one_budget_answers_only_for_itself() -> None:
    study = analyze(study_trials(budgets=(120,)))
    assert study["power_law"] is None and any("no power law" in n for n in study["notes"])
    n, _ = size_for_minutes(study, 2)
    assert n == pytest.approx(n_opt(120), rel=0.05)
    with pytest.raises(ScalingError, match="cannot answer 5 minutes: no power law"):
        size_for_minutes(study, 5)


def test_an_optimum_at_the_edge_is_flagged_and_kept_out_of_the_power_law() -> None:
    trials = study_trials()
    # at 240 s, only sizes below a quarter of the optimum: bits per byte still falling at the largest one
    trials = [t for t in trials if t["params"]["train.max_seconds"] != 240]
    for n in np.geomspace(n_opt(240) / 40, n_opt(240) / 4, 5):
        trials.append({"status": "TERMINATED", "n_params": int(n), "params": {"train.max_seconds": 240},
                       "dev_bpb": curve(n, 240) + 0.0001 * math.log(n)})  # fmt: skip
    study = analyze(trials)
    edge = study["budgets"][2]
    assert edge["edge"] == "largest"
    assert "the optimum is at the largest size tried" in edge["note"] and "add larger sizes" in edge["note"]
    assert study["power_law"]["budgets"] == [60.0, 120.0]


def test_report_writes_the_chart_and_numbers_and_never_raises_on_degenerate_studies(tmp_path: Path) -> None:
    trials = study_trials(budgets=(60, 120))
    trials.append({"status": "KILLED", "n_params": 5000, "params": {"train.max_seconds": 60}, "dev_bpb": 3.0})
    trials.append({"status": "TERMINATED", "n_params": 5000, "params": {"train.max_seconds": 30},
                   "dev_bpb": 3.0})  # fmt: skip
    text = report(trials, None, None, tmp_path / "out")
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert saved["power_law"]["b"] == pytest.approx(B_TRUE, abs=0.1)
    assert "30s: a parabola needs at least 3 different sizes, got 1" in text
    assert "left out of the fits: KILLED x1" in text
    assert "power law: N_opt = " in text and "for 10 minutes of training: about" in text
    # nothing usable at all: still a summary, saying why
    empty = report([{"status": "FAILED", "n_params": 1, "params": {}}], None, None, tmp_path / "empty")
    assert "no power law" in empty and "FAILED x1" in empty


def test_trials_without_a_budget_need_a_default(tmp_path: Path) -> None:
    trials = [dict(t, params={}) for t in study_trials(budgets=(120,))]
    assert analyze(trials)["budgets"] == []
    study = analyze(trials, default_budget=120)
    assert study["budgets"][0]["optimum_params"] == pytest.approx(n_opt(120), rel=0.05)
