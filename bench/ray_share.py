"""Ray's share of a training budget: the steps `lm train` on Ray Train makes against `lm train --local` in the same
time (issue 15 asks for 98%), with Ray Train as it comes (``LMLAB_LEAN=0``) beside it.

    python -m bench.ray_share                      # 3 rounds of the three modes, 120 s each (about 20 minutes)
    python -m bench.ray_share --seconds 60 --rounds 5

Each run is ``lm train experiments/tiny.yaml train.max_seconds=SECONDS --out DIR --restart --no-sample`` (on a Ray
of its own, or ``--local``), tracked in a scratch MLflow store, so the user's ``mlflow.db`` gets no bench runs. A
first run, not counted, creates that store and the token cache. The modes take turns in every round, in an order
that rotates, so the VM's drift over minutes falls on all three; the ratios are taken within each round. The
budget is counted from each run's first step, so the start-up (``python -m bench.startup``) is not in it.
Results: bench/results/ray_share.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.startup import ROOT, command, first_step_s, write_results

FINAL = re.compile(
    r"^\S+: step (\d+), ([0-9.]+)s of training -> val perplexity ([0-9.]+), ([0-9.]+) bits/byte", re.MULTILINE
)
MODES: dict[str, tuple[list[str], dict[str, str]]] = {
    "ray": ([], {}),
    "ray, LMLAB_LEAN=0": ([], {"LMLAB_LEAN": "0"}),
    "local": (["--local"], {}),
}
TARGET = 0.98


def final_line(output: str) -> dict | None:
    """Steps, seconds trained, val perplexity and bits per byte from the run's result line (None: no such line)."""
    found = FINAL.search(output)
    if found is None:
        return None
    steps, trained_s, ppl, bits = found.groups()
    return {"steps": int(steps), "trained_s": float(trained_s), "val_ppl": float(ppl), "val_bpb": float(bits)}


def one_run(temp: Path, mode: str, seconds: float) -> dict:
    """One `lm train` in ``mode``; its steps, val perplexity and (on Ray) time to the first step."""
    extra, env_vars = MODES[mode]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LMLAB_LEAN")}  # a Ray of its own
    env.update(env_vars)
    started = time.time()
    proc = subprocess.run(command(temp, seconds, extra), cwd=ROOT, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    result = final_line(output)
    if proc.returncode != 0 or result is None:
        raise SystemExit(
            f"bench.ray_share: lm train ({mode}) exited with {proc.returncode}:\n{output[-3000:]}"
        )
    return {**result, "first_step_s": first_step_s(output), "run_s": round(time.time() - started, 1)}


def summarise(rounds: list[dict[str, dict]]) -> dict:
    """Per mode: steps, medians; per Ray mode: its steps over the local run's of the same round."""
    modes: dict[str, dict] = {}
    for mode in MODES:
        steps = [r[mode]["steps"] for r in rounds]
        modes[mode] = {"steps": steps, "median_steps": statistics.median(steps),
                       "val_ppl": [r[mode]["val_ppl"] for r in rounds],
                       "val_bpb": [r[mode]["val_bpb"] for r in rounds]}  # fmt: skip
        if mode != "local":
            shares = [r[mode]["steps"] / r["local"]["steps"] for r in rounds]
            modes[mode]["share_per_round"] = [round(s, 3) for s in shares]
            modes[mode]["median_share"] = round(statistics.median(shares), 3)
            modes[mode]["first_step_s"] = [r[mode]["first_step_s"] for r in rounds]
    return modes


def measure(rounds: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmlab-share-", dir="/tmp") as tmp:
        temp = Path(tmp)
        print("warm-up run (creates the scratch MLflow store; not counted)...", flush=True)
        one_run(temp, "local", 3)
        done: list[dict[str, dict]] = []
        names = list(MODES)
        for i in range(rounds):
            order = names[i % len(names) :] + names[: i % len(names)]  # who goes first rotates
            got: dict[str, dict] = {}
            for mode in order:
                got[mode] = run = one_run(temp, mode, seconds)
                print(f"round {i + 1}/{rounds} {mode}: {run['steps']} steps, val perplexity {run['val_ppl']:.2f}",
                      flush=True)  # fmt: skip
            done.append(got)
    return {"seconds": seconds, "rounds": done, "modes": summarise(done), "target": TARGET,
            "loadavg_after": os.getloadavg()}  # fmt: skip


def print_report(result: dict) -> None:
    print(f"\nsteps in {result['seconds']:g} s of lm train experiments/tiny.yaml (median over rounds; Ray's share is "
          "its steps over the local run's of the same round)")  # fmt: skip
    for mode, s in result["modes"].items():
        line = f"  {mode:>18}: median {s['median_steps']:g} steps ({' / '.join(map(str, s['steps']))})"
        if "median_share" in s:
            shares = " / ".join(f"{v:.0%}" for v in s["share_per_round"])
            line += f"; share {s['median_share']:.0%} ({shares})"
            if mode == "ray":
                line += f", target {result['target']:.0%}: {'met' if s['median_share'] >= result['target'] else 'not met'}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes (default 3)")
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="each run's budget (default 120, make train's)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.seconds <= 0:
        parser.error(f"--seconds {args.seconds:g}: must be positive")
    result = measure(args.rounds, args.seconds)
    print_report(result)
    write_results("ray_share.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
