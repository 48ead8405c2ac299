"""``lm runs compare``: MLflow runs side by side in the terminal, a sweep expanded to its trials.

A parent (sweep) run id stands for its child runs (tag ``mlflow.parentRunId``); plain run ids stand for
themselves, and unique prefixes work as in ``lm runs show``. One row per run, sorted by dev bits per byte
(the number sweeps decide on), with the params that differ between the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmplatform.tracking import STEP_TAG, TrackingError, _existing_store, _find_run, _quote, _table

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
BEST_TAG = "best"
# Params that differ between any two runs by construction (where they write), never by recipe.
IDENTITY_PARAMS = frozenset({"train.out_dir", "ray.run_name", "ray.storage_path", "name"})
MAX_PARAM_COLUMNS = 10


@dataclass(frozen=True)
class Row:
    """One run as the comparison shows it."""

    run_id: str
    name: str
    sweep: str | None  # the parent run id when the run came from expanding a sweep
    status: str
    best: bool
    params: dict[str, str]
    step: int | None
    tokens: float | None
    dev_bpb: float | None
    val_bpb: float | None
    val_ppl: float | None


def collect(client: MlflowClient, refs: Sequence[str]) -> list[Row]:
    """The runs ``refs`` name, each sweep replaced by its children, in order and without duplicates."""
    rows: dict[str, Row] = {}
    for ref in refs:
        run = _find_run(client, ref)
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{_quote(run.info.run_id)}'",
            max_results=10_000,
            order_by=["attributes.start_time ASC"],
        )
        for r in children or [run]:
            if r.info.run_id not in rows:
                rows[r.info.run_id] = _row(client, r, run.info.run_id if children else None)
    return list(rows.values())


def compare_runs(uri: str, refs: Sequence[str]) -> str:
    """The comparison table for ``refs`` (run ids, unique prefixes, sweep parents) in the store at ``uri``."""
    if not refs:
        raise TrackingError("lm runs compare: give one or more run ids (or sweep parent run ids)")
    return format_rows(collect(_existing_store(uri), refs))


def format_rows(rows: list[Row]) -> str:
    """Sorted by dev bits per byte (runs without one last): a table and a line saying what it shows."""
    if not rows:
        return "no runs"
    rows = sorted(rows, key=lambda r: (r.dev_bpb is None, r.dev_bpb if r.dev_bpb is not None else 0.0))
    params = [r.params for r in rows]
    keys = set().union(*params) - IDENTITY_PARAMS
    # A key some runs lack (ray.* in a --local run) is a launcher difference unless its values differ too.
    differing = sorted(k for k in keys if len({p[k] for p in params if k in p}) > 1)
    shown, hidden = differing[:MAX_PARAM_COLUMNS], differing[MAX_PARAM_COLUMNS:]
    sweeps = {r.sweep for r in rows}
    header = ["", "run id", "name", *(["sweep"] if len(sweeps) > 1 else []), "status", "step", "tokens"]
    header += ["dev bpb", "val bpb", "val ppl", *shown]
    table = [header]
    for r in rows:
        table.append([
            "*" if r.best else "", r.run_id[:12], r.name, *([(r.sweep or "-")[:8]] if len(sweeps) > 1 else []),
            r.status, _fmt(r.step, "{:,}"), _fmt_tokens(r.tokens), _fmt(r.dev_bpb, "{:.4f}"),
            _fmt(r.val_bpb, "{:.4f}"), _fmt(r.val_ppl, "{:.2f}"), *(r.params.get(k, "-") for k in shown),
        ])  # fmt: skip
    parents = sorted(s for s in sweeps if s)
    lines = [_table(table)]
    what = f"{len(rows)} run{'s' if len(rows) != 1 else ''}"
    if parents:
        what += f" ({', '.join(f'sweep {p[:12]}' for p in parents)} expanded to its trials)"
    lines.append(f"{what}, sorted by dev bits per byte, lowest first; * = the sweep's best (tag best=true)")
    if not differing:
        lines.append("no params differ between these runs")
    if hidden:
        lines.append(f"({len(hidden)} more differing params: {', '.join(hidden)})")
    return "\n".join(lines)


def _row(client: MlflowClient, run: Any, sweep: str | None) -> Row:
    m, tags = run.data.metrics, run.data.tags
    step = _int(tags.get(STEP_TAG))
    if step is None:  # still running (the step tag is written at the end): the last logged step
        history = client.get_metric_history(run.info.run_id, "train_loss")
        step = max((h.step for h in history), default=None)
    return Row(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        sweep=sweep,
        status=run.info.status,
        best=tags.get(BEST_TAG, "").lower() == "true",
        params=dict(run.data.params),
        step=step,
        tokens=m.get("tokens", _tokens_from_params(run.data.params, step)),
        dev_bpb=m.get("dev_bpb"),
        val_bpb=m.get("val_bpb"),
        val_ppl=m.get("val_ppl"),
    )


def _tokens_from_params(params: dict[str, str], step: int | None) -> float | None:
    """Tokens trained by ``step`` from the logged config, for runs that ended before their first ``tokens`` log
    line (the loop logs it every train.log_interval steps)."""
    keys = ("train.batch_size", "train.grad_accum_steps", "model.block_size")
    sizes = [_int(params.get(k)) for k in keys]
    if step is None or any(v is None for v in sizes):
        return None
    workers = max(1, _int(params.get("ray.num_workers")) or 1)  # 0: local mode, one process
    return float(step * math.prod(sizes) * workers)  # type: ignore[arg-type]


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _fmt_tokens(tokens: float | None) -> str:
    if tokens is None:
        return "-"
    return (
        f"{tokens / 1e6:.2f}M"
        if tokens >= 1e6
        else f"{tokens / 1e3:.0f}K"
        if tokens >= 1e3
        else f"{tokens:.0f}"
    )
