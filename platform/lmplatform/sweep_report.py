"""What a sweep leaves in MLflow: the parent run, the trials table, plots, the best trial and its registration.

The parent run is found again on a re-run by its sweep tag; the trials table is rebuilt from Tune's experiment
state (so it is complete after a resume too) and the children's MLflow runs; every child ends with a final
status (none is left RUNNING).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.config import ConfigError, to_dict
from lmplatform.sizes import count_params
from lmplatform.tracking import (
    BEST_ARTIFACT_TAG,
    FAILURE_TAG,
    NOTE_TAG,
    RunTracker,
    _experiment_id,
    _history,
    _quote,
    mlflow_client,
)
from lmplatform.tune import (
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    Sweep,
    SweepOutcome,
    stopped_note,
    trained_budget,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("lmplatform.tune")

ROLE_TAG = "lmlab.role"  # "sweep" on a parent run
BEST_TAG = "best"  # "true" on the best trial's child run
COLUMNS = (
    "trial_id", "status", "params", "n_params", "step", "tokens", "seconds", "dev_loss", "dev_bpb", "val_bpb",
    "val_perplexity", "run_id", "checkpoint",
)  # fmt: skip
CURVES_PNG = "dev_loss_curves.png"
BPB_PNG = "bpb_vs_params.png"
PLOT_DATA = "plots.json"  # the series each PNG draws, so the plots can be checked and re-drawn
_STATUS_LABELS = {"TERMINATED": "trained its whole budget", "KILLED": "stopped early by the scheduler"}


# --------------------------------------------------------------------------------------------------------------
# Parent run


def open_parent(sweep: Sweep, resuming: bool) -> str:
    """The sweep's parent run: the one a resumed sweep started (found by its sweep tag), else a new one."""
    tc = sweep.pcfg.tracking
    client = mlflow_client(str(tc.uri))
    experiment_id = _experiment_id(client, str(tc.experiment), tc.artifact_location)
    params = {f"search.{d.key}": d.describe() for d in sweep.dims}
    params |= {f"tune.{k}": str(v) for k, v in to_dict(sweep.pcfg.tune).items()}
    if resuming:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = '{_quote(sweep.path)}' and tags.`{ROLE_TAG}` = 'sweep'",
            order_by=["attributes.start_time DESC"],
        )
        if found:
            run = found[0]
            logged = {k: v for k, v in run.data.params.items() if k.startswith("search.")}
            wanted = {k: v for k, v in params.items() if k.startswith("search.")}
            if logged != wanted:
                raise ConfigError(
                    f"sweep {sweep.name!r} in {sweep.path} ran with another search space ({_fmt_space(logged)}); "
                    f"Tune resumes a sweep with its first space: set tune.name to start a new sweep"
                )
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("resuming MLflow parent run %s", run.info.run_id)
            return run.info.run_id
    tags = {
        SWEEP_TAG: sweep.path,
        ROLE_TAG: "sweep",
        "lmlab.experiment": sweep.config({}).name,
        "mlflow.source.name": "lm sweep",
        NOTE_TAG: f"sweep {sweep.name}: {_fmt_space(params)}",
    }
    run_id = client.create_run(experiment_id, run_name=sweep.name, tags=tags).info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    space = {d.key: {d.kind: list(d.values)} for d in sweep.dims}
    client.log_text(
        run_id, json.dumps({"search": space, "tune": to_dict(sweep.pcfg.tune)}, indent=2), "sweep.json"
    )
    return run_id


def _fmt_space(params: dict[str, str]) -> str:
    return ", ".join(
        f"{k.removeprefix('search.')}: {v}" for k, v in params.items() if k.startswith("search.")
    )


# --------------------------------------------------------------------------------------------------------------
# Trials table


def trials_table(sweep: Sweep) -> list[dict[str, Any]]:
    """One dict per trial (keys: :data:`COLUMNS`), read from Tune's experiment state in the sweep directory."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(sweep.path, default_metric="dev_loss", default_mode="min").trials
    except Exception as exc:  # nothing saved yet (interrupted at once)
        log.warning("no trials recorded in %s: %s", sweep.path, exc)
        return []
    children = _children(sweep)
    rows = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        last = t.last_result or {}
        params = {k: t.config.get(k) for k in sweep.keys}
        n_params = last.get("n_params")
        if n_params is None:
            try:
                n_params = count_params(sweep.config(params).model)
            except ConfigError:
                n_params = None
        checkpoint = sweep.run_dir(t.trial_id) / "best"
        rows.append({
            "trial_id": t.trial_id,
            "status": _status(sweep, t),
            "params": params,
            "n_params": int(n_params) if n_params is not None else None,
            "step": int(last["step"]) if "step" in last else None,
            "tokens": int(last["tokens"]) if "tokens" in last else None,
            "seconds": last.get("train_seconds"),  # training time; None until the trial finished
            "dev_loss": last.get("dev_loss"),
            "dev_bpb": last.get("dev_bpb"),
            "val_bpb": last.get("val_bpb"),
            "val_perplexity": last.get("val_ppl"),
            "run_id": children.get(t.trial_id),
            "checkpoint": str(checkpoint) if checkpoint.is_dir() else None,
        })  # fmt: skip
    return rows


def _status(sweep: Sweep, trial: Any) -> str:
    """TERMINATED (trained its budget), KILLED (stopped by the scheduler), FAILED, or RUNNING (unfinished)."""
    status = str(trial.status)
    if status == "ERROR":
        return "FAILED"
    if status == "TERMINATED":
        return "TERMINATED" if trained_budget(sweep, trial.trial_id, trial.last_result or {}) else "KILLED"
    return "RUNNING"


def _children(sweep: Sweep) -> dict[str, str]:
    """trial id -> child run id, for this sweep's parent run."""
    if sweep.parent_run_id is None:
        return {}
    client = mlflow_client(str(sweep.pcfg.tracking.uri))
    experiment_id = client.get_run(sweep.parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}'", max_results=5000
    )
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial that trained its whole budget with the lowest dev bits per byte (None: no such trial)."""
    done = [t for t in trials if t["status"] == "TERMINATED" and _finite(t["dev_bpb"])]
    return min(done, key=lambda t: t["dev_bpb"]) if done else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as aligned text columns."""
    if not rows:
        return "(no trials)"
    header = list(rows[0])
    cells = [header] + [[_cell(r.get(k)) for k in header] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def flat_rows(trials: list[dict[str, Any]], wide: bool = True) -> list[dict[str, Any]]:
    """The trials table with ``params`` spread into one column per searched key (CSV, markdown); ``wide=False``
    leaves out the run id and checkpoint path (the terminal's summary: `lm runs compare` has them)."""
    out = []
    for t in trials:
        row = {"trial_id": t["trial_id"], "status": t["status"]}
        row |= {k: v for k, v in (t["params"] or {}).items()}
        row |= {k: t[k] for k in COLUMNS if k not in ("trial_id", "status", "params")}
        if not wide:
            row = {k: v for k, v in row.items() if k not in ("run_id", "checkpoint")}
        out.append(row)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.4g}"
    return str(value)


def to_csv(trials: list[dict[str, Any]]) -> str:
    """The trials table as CSV."""
    rows = flat_rows(trials)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def to_markdown(trials: list[dict[str, Any]]) -> str:
    """The trials table as a markdown table."""
    rows = flat_rows(trials)
    if not rows:
        return "(no trials)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The live table (SweepCallback prints it while the sweep runs)


def live_table(trials: list[Any], keys: list[str], trained: Callable[[Any], bool]) -> str:
    """The terminal's view of a running sweep: one row per trial; ``trained(trial)``: it trained its budget."""
    counts: dict[str, int] = {}
    rows = []
    for t in trials:
        status = str(t.status)
        if status == "TERMINATED" and not trained(t):  # the scheduler stopped it (or Ctrl-C did)
            status = "KILLED"
        status = {"ERROR": "FAILED"}.get(status, status)
        counts[status] = counts.get(status, 0) + 1
        last = t.last_result or {}
        rows.append({
            "trial": t.trial_id,
            **{k: _short(t.config.get(k)) for k in keys},
            "status": status,
            "step": f"{int(last['step']):,}" if "step" in last else "-",
            "dev loss": f"{last['dev_loss']:.4f}" if "dev_loss" in last else "-",
            "dev bpb": f"{last['dev_bpb']:.4f}" if "dev_bpb" in last else "-",
        })  # fmt: skip
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return f"{len(trials)} trials: {summary}\n" + format_table(rows)


def trial_error(trial: Any) -> str:
    """The last line of a trial's error (Tune keeps the traceback in a file), else 'unknown error'."""
    with contextlib.suppress(Exception):
        path = trial.error_file or trial.pickled_error_file
        if path and Path(path).is_file() and str(path).endswith(".txt"):
            lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
            if lines:
                return lines[-1][:500]
    return "unknown error"


# --------------------------------------------------------------------------------------------------------------
# Plots


def plot_series(client: MlflowClient, trials: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """What the two PNGs draw: each trial's dev loss by step, and final dev bits/byte by parameter count."""
    curves = {}
    for t in trials:
        if t["run_id"]:
            points = _history(client, t["run_id"], "dev_loss")
            if points:
                curves[_label(t, keys)] = [[s, v] for s, v in points]
    scatter: dict[str, list[list[float]]] = {}
    for t in trials:
        if t["n_params"] and _finite(t["dev_bpb"]):
            scatter.setdefault(t["status"], []).append([t["n_params"], t["dev_bpb"], t["trial_id"]])
    return {"dev_loss_curves": curves, "bpb_vs_params": scatter}


def _label(t: dict[str, Any], keys: list[str]) -> str:
    params = ", ".join(f"{k.split('.')[-1]}={_short(t['params'].get(k))}" for k in keys)
    return f"{t['trial_id']} ({params})"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def draw_plots(series: dict[str, Any], out: Path, title: str) -> list[Path]:
    """Write the dev-loss-curves and bits/byte-vs-parameters PNGs into ``out``; returns the files written."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    written = []
    if series["dev_loss_curves"]:
        fig = Figure(figsize=(8, 5), dpi=100)
        ax = fig.subplots()
        for label, points in series["dev_loss_curves"].items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("dev loss (nats/token)")
        ax.set_title(f"{title}: dev loss of every trial")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(series["dev_loss_curves"]) > 12 else 1)
        fig.tight_layout()
        fig.savefig(out / CURVES_PNG)
        written.append(out / CURVES_PNG)
    if series["bpb_vs_params"]:
        fig = Figure(figsize=(7, 5), dpi=100)
        ax = fig.subplots()
        for status, points in sorted(series["bpb_vs_params"].items()):
            ax.scatter(
                [p[0] for p in points], [p[1] for p in points], label=_STATUS_LABELS.get(status, status)
            )
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("final dev bits per byte")
        ax.set_title(f"{title}: dev bits/byte against model size")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / BPB_PNG)
        written.append(out / BPB_PNG)
    return written


# --------------------------------------------------------------------------------------------------------------
# The end of a sweep


def conclude(outcome: SweepOutcome) -> None:
    """Final child statuses, the parent's artifacts and metrics, best trial tagged and registered, scaling
    report; then the parent ends (FINISHED; KILLED when interrupted; FAILED when no trial finished)."""
    sweep, trials = outcome.sweep, outcome.trials
    best = outcome.best = best_trial(trials)
    parent = outcome.parent_run_id
    client = mlflow_client(str(sweep.pcfg.tracking.uri)) if parent is not None else None
    if client is not None:
        _end_children(client, sweep, trials)
    report_dir = Path(sweep.path) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "trials.csv").write_text(to_csv(trials))
    (report_dir / "trials.md").write_text(to_markdown(trials))
    if best is not None:
        best_info = {k: best[k] for k in COLUMNS} | {"config": to_dict(sweep.config(best["params"]))}
        (report_dir / "best_trial.json").write_text(json.dumps(best_info, indent=2, default=str))
    if client is None or parent is None:  # tracking.enabled=false: the tables and best_trial.json only
        return
    import time

    from mlflow.entities import Metric, RunTag

    series = plot_series(client, trials, sweep.keys)  # the curves come from the children's metric history
    (report_dir / PLOT_DATA).write_text(json.dumps(series, indent=1))
    draw_plots(series, report_dir, sweep.name)
    client.log_artifacts(parent, str(report_dir))
    counts = {s: sum(t["status"] == s for t in trials) for s in ("TERMINATED", "KILLED", "FAILED", "RUNNING")}
    metrics = {f"trials_{s.lower()}": float(n) for s, n in counts.items()}
    tags = {"lmlab.trials": str(len(trials))}
    if best is not None:
        metrics |= {
            f"best_{k}": float(best[k]) for k in ("dev_loss", "dev_bpb", "val_bpb") if _finite(best[k])
        }
        tags |= {"lmlab.best_trial": best["trial_id"], "lmlab.best_run_id": str(best["run_id"])}
        tags |= {f"lmlab.best.{k}": str(v) for k, v in best["params"].items()}
        _tag_best(client, trials, best)
        outcome.model_version, outcome.alias_note = _register(sweep, best)
    now = int(time.time() * 1000)
    client.log_batch(
        parent,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    if sweep.pcfg.tune.study == "scaling" and not outcome.interrupted:
        from lmplatform.scaling import report

        outcome.summary = report(trials, parent, client, report_dir)
    if outcome.interrupted:
        status = "KILLED"
    else:
        status = "FINISHED" if counts["TERMINATED"] else "FAILED"
    client.set_terminated(parent, status=status)


def _end_children(client: MlflowClient, sweep: Sweep, trials: list[dict[str, Any]]) -> None:
    """Every child ends with its trial's status: what the driver's callback missed (a killed driver, an
    interrupted sweep), and a stopped trial whose process, torn down by Tune, ended its own run FAILED."""
    from mlflow.entities import RunTag

    for t in trials:
        if not t["run_id"]:
            continue
        run = client.get_run(t["run_id"])
        # a stopped trial's run ends KILLED whatever its process wrote last (but one already KILLED keeps its time)
        stopped = t["status"] == "KILLED" and run.info.status not in ("FINISHED", "KILLED")
        if run.info.status != "RUNNING" and not stopped:
            continue
        status = {"TERMINATED": "FINISHED", "FAILED": "FAILED"}.get(t["status"], "KILLED")
        note = None
        if t["status"] == "RUNNING":
            note = "sweep interrupted: run the same `lm sweep` again to resume"
        elif t["status"] == "KILLED":
            note = stopped_note(sweep, t["step"], t["dev_loss"])
        if note:
            client.log_batch(t["run_id"], tags=[RunTag(NOTE_TAG, note)])
        if stopped and FAILURE_TAG in run.data.tags:
            client.delete_tag(t["run_id"], FAILURE_TAG)
        # a run its process already ended keeps its end time: the duration the UI shows is the trial's own
        client.set_terminated(t["run_id"], status=status, end_time=run.info.end_time or None)


def _tag_best(client: MlflowClient, trials: list[dict[str, Any]], best: dict[str, Any]) -> None:
    """Tag ``best=true`` on the best trial's child run only (a resumed sweep may have found another)."""
    for t in trials:
        if not t["run_id"]:
            continue
        if t is best:
            client.set_tag(t["run_id"], BEST_TAG, "true")
        elif client.get_run(t["run_id"]).data.tags.get(BEST_TAG):
            client.delete_tag(t["run_id"], BEST_TAG)


def _register(sweep: Sweep, best: dict[str, Any]) -> tuple[str | None, str | None]:
    """Register the best trial's best checkpoint the way `lm train` does; (version, why the alias moved)."""
    tc = sweep.pcfg.tracking
    if not tc.register_model:
        return None, "not registered: tracking.register_model is false"
    client = mlflow_client(str(tc.uri))
    run = client.get_run(best["run_id"])
    artifact = run.data.tags.get(BEST_ARTIFACT_TAG)
    if not artifact or not best["checkpoint"]:
        return None, f"not registered: trial {best['trial_id']} logged no best checkpoint"
    tracker = RunTracker(client, str(tc.uri), str(tc.experiment), best["run_id"], resumed=True)
    version = tracker.register_best(Path(best["checkpoint"]), artifact)
    return version, tracker.alias_note


def summary(outcome: SweepOutcome) -> str:
    """What `lm sweep` prints at the end: the trials, the best one, where MLflow and the plots have them."""
    sweep = outcome.sweep
    lines = [
        f"sweep {sweep.name}: {len(outcome.trials)} trials ({sweep.path})",
        format_table(flat_rows(outcome.trials, wide=False)),
    ]
    failed = [t["trial_id"] for t in outcome.trials if t["status"] == "FAILED"]
    if failed:
        lines.append(f"failed: {', '.join(failed)} (the reason is on each child run: lm runs show RUN)")
    best = outcome.best
    if best is None:
        lines.append("no trial trained its whole budget: no best trial")
    else:
        params = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        lines.append(
            f"best: trial {best['trial_id']} ({params}): dev {best['dev_bpb']:.4f} bits/byte"
            + (f", val {best['val_bpb']:.4f} bits/byte" if _finite(best["val_bpb"]) else "")
            + (f", val perplexity {best['val_perplexity']:.2f}" if _finite(best["val_perplexity"]) else "")
            + f"; checkpoint {best['checkpoint']}"
        )
    if outcome.parent_run_id is not None:
        tc = sweep.pcfg.tracking
        lines.append(
            f"mlflow: parent run {outcome.parent_run_id} in experiment {tc.experiment!r} at {tc.uri}"
        )
        if outcome.model_version is not None:
            lines.append(f"        registered as models:/lmlab-{tc.experiment}/{outcome.model_version}")
        if outcome.alias_note:
            lines.append(f"        {outcome.alias_note}")
        lines.append(f"        compare with `lm runs compare {outcome.parent_run_id}` or `make mlflow-ui`")
    lines.append(f"report: {Path(sweep.path) / 'report'} (trials.csv, trials.md, {CURVES_PNG}, {BPB_PNG})")
    if outcome.summary:
        lines.append(outcome.summary)
    if outcome.interrupted:
        lines.append("interrupted: run the same command again to resume the unfinished trials")
    return "\n".join(lines)
