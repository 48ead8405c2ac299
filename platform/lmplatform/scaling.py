"""Iso-time scaling studies: which model size is best for a training budget, and how that size grows.

In the spirit of Chinchilla's IsoFLOP profiles (Hoffmann et al., 2022, approach 2): for each budget
(``train.max_seconds``), bits per byte against parameter count is fitted by a parabola in log(params); its vertex
is the compute-optimal size. Across budgets the optima are fitted by a power law ``N_opt = a * seconds^b``.
With five sizes per budget on a noisy 2-core machine the vertex is uncertain, so every optimum comes with a band
from a parametric bootstrap (Gaussian noise of the residuals' size, that size itself uncertain, added to the
fitted curve and refitted), and the power law's band from refitting it to the bootstrapped optima.
:func:`report` is what a sweep with ``tune.study: scaling`` calls at its end; :func:`size_for_minutes` answers
"which size for N minutes?" from the numbers it logged.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmplatform.tracking import _table

if TYPE_CHECKING:
    from mlflow import MlflowClient

BUDGET_KEY = "train.max_seconds"
METRIC = "dev_bpb"  # decisions look at dev (DESIGN.md section 3); val is reported beside it
CONFIDENCE = 0.9
N_BOOT = 1000
STUDY_JSON = "scaling.json"
STUDY_PNG = "scaling.png"


class ScalingError(ValueError):
    """A scaling fit is impossible on these points (too few sizes, no minimum, no study)."""


# --------------------------------------------------------------------------------------------------------------
# Fits


def fit_parabola(
    log_params: Sequence[float], bpb: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[tuple[float, float, float], float, tuple[float, float]]:
    """Fit ``bpb = c2 * x^2 + c1 * x + c0`` with ``x = ln(params)``; return ``(coeffs, optimum, band)``.

    ``optimum`` is the vertex and ``band`` its ``confidence`` interval, both in ln(params) like the input
    (``(nan, nan)`` when the points leave no residuals: three sizes fit any parabola exactly).
    Raises ScalingError with fewer than 3 distinct sizes or when the parabola has no minimum.
    """
    fit = _fit_parabola(np.asarray(log_params, float), np.asarray(bpb, float), confidence, seed)
    return fit["coeffs"], fit["optimum"], fit["band"]


def _fit_parabola(x: np.ndarray, y: np.ndarray, confidence: float, seed: int) -> dict[str, Any]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    sizes = np.unique(np.round(x, 9))
    if sizes.size < 3:
        raise ScalingError(
            f"a parabola needs at least 3 different sizes, got {sizes.size} "
            f"({', '.join(_fmt_params(math.exp(s)) for s in sizes) or 'none'}): add sizes to the study"
        )
    m = float(x.mean())  # centred: ln(params) ~ 12-15, whose squares would cost the fit its precision
    X = np.stack([(x - m) ** 2, x - m, np.ones_like(x)], axis=1)  # (n, 3)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    a, b, c = (float(v) for v in beta)
    if a <= 0:
        raise ScalingError(
            "bits per byte does not curve up around any size (the fitted parabola opens downward or is flat): "
            "the sizes all lie on one side of the optimum, or the noise hides the curvature; widen the range of "
            "sizes or add seeds"
        )
    vertex = m - b / (2 * a)
    coeffs = (a, b - 2 * a * m, a * m * m - b * m + c)  # back from (x - m) to x
    residuals = y - X @ beta
    n = x.size
    draws = np.full(N_BOOT, np.nan)
    band = (math.nan, math.nan)
    if n > 3 and float(np.abs(residuals).max()) > 0:
        Y = (X @ beta)[:, None] + _noise(residuals, 3, np.random.default_rng(seed))  # (n, N_BOOT)
        B, *_ = np.linalg.lstsq(X, Y, rcond=None)  # (3, N_BOOT)
        # A draw that opens downward has its minimum at an edge of the sizes tried, or beyond: unbounded.
        edge = np.where(B[1] < 0, np.inf, -np.inf)  # falling at the centre: the minimum lies to the right
        draws = np.where(B[0] > 0, m - B[1] / (2 * np.where(B[0] > 0, B[0], 1.0)), edge)
        band = _interval(draws, confidence)
    return {
        "coeffs": coeffs,
        "optimum": float(vertex),
        "band": band,
        "draws": draws,
        "min_bpb": float(a * (vertex - m) ** 2 + b * (vertex - m) + c),
        "residual_std": float(residuals.std(ddof=3)) if n > 3 else math.nan,
    }


def fit_power_law(
    budgets: Sequence[float],
    optima: Sequence[float],
    draws: np.ndarray | None = None,
    *,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, tuple[float, float]]:
    """Fit ``N_opt = a * budget^b`` (a line in log-log); return ``(a, b, band)``, band the interval of ``b``.

    ``draws`` (one row of bootstrapped ln-optima per budget) gives the band by refitting to each column; without
    it, three or more budgets give it from the line's own residuals, two give ``(nan, nan)``.
    """
    log_a, b, samples = _fit_power_law(np.asarray(budgets, float), np.asarray(optima, float), draws)
    return math.exp(log_a), b, _interval(samples[:, 1], confidence) if samples.size else (math.nan, math.nan)


def _fit_power_law(
    budgets: np.ndarray, optima: np.ndarray, draws: np.ndarray | None, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """(ln a, b, samples of (ln a, b) as rows) for ln N = ln a + b ln budget."""
    if budgets.size < 2 or np.unique(budgets).size < 2:
        raise ScalingError(
            f"a power law needs optima at 2 or more different budgets, got {np.unique(budgets).size}: "
            "add budgets (train.max_seconds) to the study"
        )
    if np.any(budgets <= 0) or np.any(optima <= 0):
        raise ScalingError("budgets and optimal sizes must be positive to fit a power law")
    t, n = np.log(budgets), np.log(optima)
    T = np.stack([np.ones_like(t), t], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(T, n, rcond=None)
    if draws is not None:
        # A resample with no minimum at some budget has no size to fit there: it is left out (that budget's own
        # band already shows it as unbounded).
        finite = np.all(np.isfinite(draws), axis=0)
        S, *_ = np.linalg.lstsq(T, draws[:, finite], rcond=None)  # (2, draws kept)
        samples = S.T
    elif budgets.size >= 3:
        residuals = n - T @ np.array([log_a, b])
        Y = (T @ np.array([log_a, b]))[:, None] + _noise(residuals, 2, np.random.default_rng(seed))
        S, *_ = np.linalg.lstsq(T, Y, rcond=None)
        samples = S.T
    else:
        samples = np.empty((0, 2))
    return float(log_a), float(b), samples


def _noise(residuals: np.ndarray, n_coeffs: int, rng: np.random.Generator) -> np.ndarray:
    """N_BOOT columns of Gaussian noise for a parametric bootstrap of a least-squares fit.

    Each column's sigma is itself drawn from the estimate's chi-squared distribution (``n - n_coeffs`` degrees of
    freedom): with 10 points, resampling the residuals as they are covered the true optimum 78-86% of the time
    for a 90% band, this 90-92% (simulated, 400 studies).
    """
    dof = residuals.size - n_coeffs
    sigma = math.sqrt(float(residuals @ residuals) / dof)
    sigmas = sigma * np.sqrt(dof / rng.chisquare(dof, N_BOOT))  # (N_BOOT,)
    return rng.normal(0.0, 1.0, (residuals.size, N_BOOT)) * sigmas


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap draws (nearest draws: no interpolation into infinity)."""
    tail = (1 - confidence) / 2
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    return tuple(float(np.quantile(values, q, method="nearest")) for q in (tail, 1 - tail))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# The study


def analyze(
    trials: Sequence[Mapping[str, Any]],
    *,
    metric: str = METRIC,
    budget_key: str = BUDGET_KEY,
    default_budget: float | None = None,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Fit every budget of a study's trials (finished ones only) and the power law; the numbers report() logs."""
    groups: dict[float, list[tuple[float, float]]] = {}
    skipped: dict[str, int] = {}
    for t in trials:
        status = str(t.get("status", "TERMINATED"))
        budget = (t.get("params") or {}).get(budget_key, default_budget)
        n, value = t.get("n_params"), t.get(metric)
        if status != "TERMINATED" or budget is None or not n or value is None or not math.isfinite(value):
            why = (
                status if status != "TERMINATED" else f"no {budget_key}" if budget is None else f"no {metric}"
            )
            skipped[why] = skipped.get(why, 0) + 1
            continue
        groups.setdefault(float(budget), []).append((float(n), float(value)))
    study: dict[str, Any] = {
        "metric": metric, "budget_key": budget_key, "budget_unit": "seconds", "confidence": confidence,
        "skipped": skipped, "budgets": [], "power_law": None, "notes": [],
    }  # fmt: skip
    if skipped:
        study["notes"].append(
            "left out of the fits: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items()))
            + " (only trials that trained their whole budget are comparable at equal time)"
        )
    usable: list[tuple[float, float, np.ndarray]] = []
    for i, (budget, points) in enumerate(sorted(groups.items())):
        params = np.array([p for p, _ in points])
        bpb = np.array([v for _, v in points])
        entry: dict[str, Any] = {
            "budget": budget, "params": params.tolist(), "bpb": bpb.tolist(), "coeffs": None,
            "optimum_params": None, "band_params": None, "min_bpb": None, "edge": None, "note": None,
            "seed_spread_bpb": _seed_spread(params, bpb),
        }  # fmt: skip
        try:
            fit = _fit_parabola(np.log(params), bpb, confidence, seed=i)
        except ScalingError as exc:
            entry["note"] = str(exc)
            study["budgets"].append(entry)
            continue
        lo, hi = fit["band"]
        entry.update(
            coeffs=list(fit["coeffs"]), optimum_params=math.exp(fit["optimum"]), min_bpb=fit["min_bpb"],
            band_params=[_exp(lo), _exp(hi)] if not math.isnan(lo) else None,
            residual_std=fit["residual_std"],
        )  # fmt: skip
        entry["edge"], entry["note"] = _edge(params, bpb, fit["optimum"])
        if entry["band_params"] is None:
            entry["note"] = _join(
                entry["note"], "3 points fit a parabola exactly: no uncertainty estimate; add sizes or seeds"
            )
        study["budgets"].append(entry)
        if entry["edge"] is None:
            usable.append((budget, math.exp(fit["optimum"]), fit["draws"]))
    if len(usable) >= 2:
        budgets = np.array([u[0] for u in usable])
        optima = np.array([u[1] for u in usable])
        draws = np.stack([u[2] for u in usable]) if all(np.isfinite(u[2]).any() for u in usable) else None
        log_a, b, samples = _fit_power_law(budgets, optima, draws)
        study["power_law"] = {
            "a": math.exp(log_a), "b": b, "b_band": list(_interval(samples[:, 1], confidence)) if samples.size
            else None, "budgets": budgets.tolist(), "optima": optima.tolist(),
            "draws": [[round(x, 6), round(y, 6)] for x, y in samples[:200].tolist()],
        }  # fmt: skip
    else:
        study["notes"].append(
            f"no power law: it needs the optimum inside the sizes tried at 2 or more budgets, got {len(usable)}"
        )
    return study


def size_for_minutes(study: Mapping[str, Any], minutes: float) -> tuple[float, tuple[float, float]]:
    """The compute-optimal parameter count for ``minutes`` of training and its band, from :func:`analyze`'s
    numbers (what :func:`report` logged as scaling.json). Raises ScalingError when the study cannot say."""
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ScalingError(f"--size-for {minutes!r}: give a positive number of minutes")
    seconds = 60.0 * minutes
    law = study.get("power_law")
    if law:
        n = law["a"] * seconds ** law["b"]
        draws = np.array(law.get("draws") or [], float).reshape(-1, 2)
        band = _interval(draws[:, 0] + draws[:, 1] * math.log(seconds), study.get("confidence", CONFIDENCE))
        return n, (_exp(band[0]), _exp(band[1]))
    for entry in study.get("budgets", []):  # no law: only a budget the study measured can be answered
        if entry.get("optimum_params") and math.isclose(entry["budget"], seconds, rel_tol=0.01):
            band = entry.get("band_params") or [math.nan, math.nan]
            return entry["optimum_params"], (band[0], band[1])
    notes = "; ".join(study.get("notes", [])) or "no budget had an optimum"
    raise ScalingError(f"the scaling study cannot answer {minutes:g} minutes: {notes}")


def describe_size_for(study: Mapping[str, Any], minutes: float) -> str:
    """``size_for_minutes`` as a sentence, saying when it extrapolates past the budgets measured."""
    n, (lo, hi) = size_for_minutes(study, minutes)
    band = f" ({int(study.get('confidence', CONFIDENCE) * 100)}% band {_fmt_params(lo)} .. {_fmt_params(hi)})"
    text = f"for {minutes:g} minute{'s' if minutes != 1 else ''} of training: about {_fmt_params(n)} parameters{band}"
    measured = [e["budget"] for e in study.get("budgets", [])]
    if measured and not min(measured) <= 60 * minutes <= max(measured):
        text += (
            f"; extrapolated beyond the budgets measured ({_fmt_seconds(min(measured))} .. "
            f"{_fmt_seconds(max(measured))}): trust it less the further out it is"
        )
    return text


def report(
    trials: Sequence[Mapping[str, Any]],
    parent_run_id: str | None,
    client: MlflowClient | None,
    out_dir: str | Path,
    **options: Any,
) -> str:
    """Fit the study, write scaling.png and scaling.json to ``out_dir``, log both (and the optima as metrics) to
    the parent run when given, and return a printable summary. Never raises on degenerate data: it says why."""
    study = analyze(trials, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_JSON).write_text(json.dumps(study, indent=1, default=_json_default))
    plotted = plot_study(study, out / STUDY_PNG)
    if client is not None and parent_run_id:
        client.log_artifact(parent_run_id, str(out / STUDY_JSON))
        if plotted:
            client.log_artifact(parent_run_id, str(out / STUDY_PNG))
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"scaling_optimum_params_{e['budget']:g}s", e["optimum_params"], now, 0)
            for e in study["budgets"]
            if e["optimum_params"] is not None
        ]
        if study["power_law"]:
            metrics += [
                Metric("scaling_power_law_a", study["power_law"]["a"], now, 0),
                Metric("scaling_power_law_b", study["power_law"]["b"], now, 0),
            ]
        if metrics:
            client.log_batch(parent_run_id, metrics=metrics)
    return summarize(study)


def summarize(study: Mapping[str, Any]) -> str:
    """The study as text: one line per budget (sizes, best measured, fitted optimum and band), then the law."""
    pct = int(study.get("confidence", CONFIDENCE) * 100)
    rows = [["budget", "sizes", "best measured", "fitted optimum", f"{pct}% band", f"min {study['metric']}"]]
    notes: list[str] = []
    for e in study["budgets"]:
        params, bpb = e["params"], e["bpb"]
        best = int(np.argmin(bpb)) if bpb else None
        band = e.get("band_params")
        rows.append([
            _fmt_seconds(e["budget"]), str(len(set(params))),
            f"{_fmt_params(params[best])} ({bpb[best]:.4f})" if best is not None else "-",
            _fmt_params(e["optimum_params"]) if e["optimum_params"] else "-",
            f"{_fmt_params(band[0])} .. {_fmt_params(band[1])}" if band else "-",
            f"{e['min_bpb']:.4f}" if e["min_bpb"] is not None else "-",
        ])  # fmt: skip
        if e.get("note"):
            notes.append(f"{_fmt_seconds(e['budget'])}: {e['note']}")
        if e.get("seed_spread_bpb"):
            notes.append(
                f"{_fmt_seconds(e['budget'])}: spread over seeds at one size: {e['seed_spread_bpb']:.4f} bits/byte"
            )
    lines = [f"scaling study: {study['metric']} against parameter count, per budget", _table(rows)]
    law = study.get("power_law")
    if law:
        band = law.get("b_band")
        band_text = f" ({pct}% band of b: {band[0]:.2f} .. {band[1]:.2f})" if band else ""
        lines.append(f"power law: N_opt = {law['a']:.4g} * seconds^{law['b']:.3f}{band_text}")
        for minutes in (1, 5, 10, 30):
            lines.append("  " + describe_size_for(study, minutes))
    lines += [f"note: {n}" for n in [*notes, *study.get("notes", [])]]
    return "\n".join(lines)


def plot_study(study: Mapping[str, Any], path: Path) -> bool:
    """Bits per byte against parameters per budget (points, fitted parabolas, optima with bands), and the optima
    against the budget with the power law; False when there is nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    from matplotlib.ticker import NullFormatter

    if not study["budgets"]:
        return False
    fig = Figure(figsize=(12, 4.8), dpi=100)
    ax, ax_law = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for i, e in enumerate(study["budgets"]):
        color = colors[i % len(colors)]
        label = _fmt_seconds(e["budget"])
        ax.scatter(e["params"], e["bpb"], color=color, s=18, label=f"{label} (trials)", zorder=3)
        if e["coeffs"] is None:
            continue
        lo, hi = math.log(min(e["params"])), math.log(max(e["params"]))
        pad = 0.15 * (hi - lo)
        xs = np.linspace(lo - pad, hi + pad, 100)
        ax.plot(np.exp(xs), np.polyval(e["coeffs"], xs), color=color, alpha=0.7, label=f"{label} fit")
        ax.plot([e["optimum_params"]], [e["min_bpb"]], marker="*", markersize=14, color=color,
                markeredgecolor="black", zorder=4)  # fmt: skip
        if e["band_params"]:
            # a band reaching far past the sizes tried (an edge optimum) is cut at the curve's drawn range
            b0, b1 = (min(max(v, math.exp(lo - pad)), math.exp(hi + pad)) for v in e["band_params"])
            ax.hlines(e["min_bpb"], b0, b1, color=color, linewidth=3, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{study['metric']} (bits per byte)")
    ax.set_title(f"iso-time curves: * optimum, bar {int(study['confidence'] * 100)}% band")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    law = study.get("power_law")
    optima = [
        (e["budget"], e["optimum_params"], e["band_params"]) for e in study["budgets"] if e["optimum_params"]
    ]
    for budget, n, band in optima:
        yerr = [[n - band[0]], [band[1] - n]] if band and all(map(math.isfinite, band)) else None
        ax_law.errorbar([budget], [n], yerr=yerr, fmt="o", color="black", capsize=3)
    if law:
        ts = np.geomspace(min(law["budgets"]) / 1.5, max(law["budgets"]) * 1.5, 50)
        ax_law.plot(ts, law["a"] * ts ** law["b"], color="C3", label=f"N = {law['a']:.3g} * s^{law['b']:.2f}")
        ax_law.legend(fontsize=8)
    ax_law.set_xscale("log")
    ax_law.set_yscale("log")
    ax_law.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide over a narrow range
    ax_law.set_xlabel("budget (seconds of training)")
    ax_law.set_ylabel("compute-optimal parameters")
    ax_law.set_title("optimal size against budget")
    ax_law.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    return True


def load_study(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    """The scaling.json a study's parent run logged; ScalingError when it has none."""
    import tempfile

    names = {a.path for a in client.list_artifacts(parent_run_id)}
    if STUDY_JSON not in names:
        raise ScalingError(
            f"run {parent_run_id} has no {STUDY_JSON}: it is not a finished scaling study (tune.study: scaling)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_run_id, STUDY_JSON, tmp)
        return json.loads(Path(path).read_text())


def size_for_sweep(path: str | Path, overrides: Sequence[str], minutes: float) -> str:
    """``lm sweep FILE --size-for MINUTES``: the answer from the newest finished study of that sweep YAML (its
    parent run, found by the sweep's tags, holds scaling.json). Raises ScalingError when there is none."""
    from lmplatform.sweep_report import ROLE_TAG
    from lmplatform.tracking import TrackingError, _existing_store, _quote
    from lmplatform.tune import SWEEP_TAG, load_sweep

    sweep = load_sweep(path, list(overrides))
    tc = sweep.pcfg.tracking
    if sweep.pcfg.tune.study != "scaling":
        raise ScalingError(
            f"{path} is not a scaling study (tune.study={sweep.pcfg.tune.study!r}, not 'scaling')"
        )
    missing = ScalingError(
        f"no finished scaling study for {path} in {tc.uri} (experiment {tc.experiment!r}, sweep {sweep.path}): "
        f"run it first with `lm sweep {path}`" + (" (make scaling)" if sweep.name == "scaling" else "")
    )
    try:
        client = _existing_store(str(tc.uri))
    except TrackingError:
        raise missing from None
    experiment = client.get_experiment_by_name(str(tc.experiment))
    runs = []
    if experiment is not None:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = '{_quote(sweep.path)}' and tags.`{ROLE_TAG}` = 'sweep'",
            order_by=["attributes.start_time DESC"],
        )
    for run in runs:
        if any(a.path == STUDY_JSON for a in client.list_artifacts(run.info.run_id)):
            study = load_study(client, run.info.run_id)
            return (
                f"{describe_size_for(study, minutes)}\n(scaling study {sweep.name}, MLflow run {run.info.run_id}: "
                f"{_budget_list(study)}; the fit, chart and numbers are its {STUDY_PNG} and {STUDY_JSON})"
            )
    raise missing


def _budget_list(study: Mapping[str, Any]) -> str:
    budgets = [e for e in study.get("budgets", []) if e.get("optimum_params")]
    return (
        "optima "
        + ", ".join(f"{_fmt_params(e['optimum_params'])} at {_fmt_seconds(e['budget'])}" for e in budgets)
        if budgets
        else "no optimum"
    )


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _edge(params: np.ndarray, bpb: np.ndarray, optimum: float) -> tuple[str | None, str | None]:
    """Whether the optimum lies at an edge of the sizes tried (measured or fitted), and what to do about it."""
    sizes = np.unique(params)
    means = np.array([bpb[params == s].mean() for s in sizes])
    lo, hi = math.log(sizes[0]), math.log(sizes[-1])
    if means.argmin() == sizes.size - 1 or optimum > hi:
        side, what = "largest", "larger"
    elif means.argmin() == 0 or optimum < lo:
        side, what = "smallest", "smaller"
    else:
        return None, None
    return side, (
        f"the optimum is at the {side} size tried ({_fmt_params(sizes[0 if side == 'smallest' else -1])} has the "
        f"lowest bits per byte, or the fit's vertex lies beyond it): the fitted {_fmt_params(math.exp(optimum))} "
        f"is an extrapolation; add {what} sizes. Left out of the power law"
    )


def _seed_spread(params: np.ndarray, bpb: np.ndarray) -> float | None:
    """The mean standard deviation of bits per byte among trials of one size (seeds), or None without repeats."""
    spreads = [float(bpb[params == s].std(ddof=1)) for s in np.unique(params) if (params == s).sum() > 1]
    return float(np.mean(spreads)) if spreads else None


def _exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) else (math.inf if x > 0 else 0.0)


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    if math.isnan(n):
        return "?"
    if math.isinf(n) or n <= 0:
        return "unbounded"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return f"{n:.0f}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"
