"""Time from the command to the first training step of `lm train` on Ray: issue 15 asks for 12 s on a second run.

    python -m bench.startup             # a warm-up run, then 3 pairs: prestarted workers, LMLAB_PREWARM=0
    python -m bench.startup --pairs 5

Each run is ``lm train experiments/tiny.yaml train.max_seconds=3 --out DIR --restart --no-sample`` on a Ray of its
own, tracked in a scratch MLflow store, so the user's ``mlflow.db`` gets no bench runs. A first run, not counted,
creates that store and the token cache: the runs after it are "second runs". The figure is the one ``lm train``
prints, counted from its process's start (read from /proc); as a check on it, the bench also keeps its own clock,
from just before it starts the process to the worker's "training tiny: ..." line, printed just before the first
step (Ray forwards it to the driver a little later). The two ways of starting take turns, so the VM's
drift over minutes falls on both. Results: bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIRST_STEP = re.compile(r"time from command start to the first training step: ([0-9.]+)s")
TRAINING = re.compile(r"\btraining \S+: [0-9,]+ parameters")  # the worker's line just before its first step
MODES = {"prestarted": "1", "LMLAB_PREWARM=0": "0"}
TARGET_S = 12.0


def first_step_s(output: str) -> float | None:
    """The time to the first step that ``lm train`` printed, or None when it printed none."""
    found = FIRST_STEP.search(output)
    return float(found.group(1)) if found else None


def command(temp: Path, seconds: float = 3, extra: Sequence[str] = ()) -> list[str]:
    """`lm train experiments/tiny.yaml` for ``seconds`` (short: on Ray, unless ``extra`` says ``--local``), its run
    and its MLflow store under ``temp``."""
    return [
        sys.executable, "-m", "lmplatform", "train", str(ROOT / "experiments" / "tiny.yaml"),
        f"train.max_seconds={seconds:g}", f"tracking.uri=sqlite:///{temp / 'mlflow.db'}",
        "--out", str(temp / "run"), "--restart", "--no-sample", *extra,
    ]  # fmt: skip


def write_results(name: str, result: dict) -> Path:
    """Write a bench's result to bench/results/``name`` and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out


def one_run(temp: Path, prewarm: str) -> dict:
    """Run the command once: its printed first step, the bench's clock to the "training" line, the run's time."""
    # a Ray of its own, which the command starts
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LMLAB_PREWARM=prewarm, PYTHONUNBUFFERED="1")
    started = time.time()
    proc = subprocess.Popen(command(temp), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines, seen_s = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if seen_s is None and TRAINING.search(line):
            seen_s = time.time() - started
    code = proc.wait()
    output = "".join(lines)
    printed = first_step_s(output)
    if code != 0 or printed is None:
        raise SystemExit(
            f"bench.startup: lm train exited with {code} without a first step:\n{output[-3000:]}"
        )
    return {"first_step_s": printed, "training_line_after_s": None if seen_s is None else round(seen_s, 2),
            "run_s": round(time.time() - started, 2)}  # fmt: skip


def summary(runs: list[dict]) -> dict:
    """Median and range of the printed first steps."""
    values = [r["first_step_s"] for r in runs]
    return {"runs": values, "median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def measure(pairs: int) -> dict:
    """A warm-up run, then ``pairs`` alternating turns of each way of starting: per mode, its runs and a summary."""
    with tempfile.TemporaryDirectory(prefix="lmlab-startup-", dir="/tmp") as tmp:
        temp = Path(tmp)
        print("warm-up run (creates the scratch MLflow store; not counted)...", flush=True)
        warm_up = one_run(temp, "1")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for i in range(pairs):
            order = list(MODES) if i % 2 == 0 else list(reversed(MODES))  # who goes first alternates too
            for mode in order:
                run = one_run(temp, MODES[mode])
                runs[mode].append(run)
                seen = run["training_line_after_s"]
                print(f"pair {i + 1}/{pairs} {mode}: first step {run['first_step_s']:.1f} s (the bench saw the "
                      f"'training' line at {'-' if seen is None else f'{seen:.1f} s'})", flush=True)  # fmt: skip
    return {
        "warm_up": warm_up,
        "modes": {mode: {**summary(rs), "detail": rs} for mode, rs in runs.items()},
        "target_s": TARGET_S,
        "loadavg_after": os.getloadavg(),
    }


def print_report(result: dict) -> None:
    print("\ntime from the command to the first training step (lm train experiments/tiny.yaml, a second run)")
    for mode, s in result["modes"].items():
        runs = " / ".join(f"{v:.1f}" for v in s["runs"])
        print(f"  {mode:>16}: median {s['median_s']:.1f} s ({runs}); target {result['target_s']:.0f} s: "
              f"{'met' if s['median_s'] <= result['target_s'] else 'not met'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs (default 3)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: must be at least 1")
    result = measure(args.pairs)
    print_report(result)
    write_results("startup.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
