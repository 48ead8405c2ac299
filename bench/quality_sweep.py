"""Quality sweep at fixed step counts: many `lm train --local` runs in parallel, ranked on the dev split.

Every decision a sweep informs looks at the dev split (held out of the training text), never at val, which is
kept for the numbers we report: the table shows and sorts by dev perplexity (val stays in the JSON, unread).
Perplexity after N steps depends on the hyperparameters, not on the hardware, so a sweep can run on
a fast machine with N set to what the 2-core reference CPU reaches in 120 s (measure its tokens/s with
`python -m bench.run --only train`), and only the winners are confirmed on the CPU with train.max_seconds=120.

    python -m bench.quality_sweep --parallel 8 --device cuda \
        --run "base: train.max_steps=1100" --run "lr4: train.max_steps=1100 optim.lr=4e-3"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(name: str, overrides: list[str], base: str, device: str, out_root: Path, threads: int) -> dict:
    """Train one configuration and return its final metrics (or the error)."""
    out = out_root / name
    cmd = [
        sys.executable, "-m", "lm", "train", "--local", "--restart", "--no-sample", base,
        f"train.out_dir={out}", f"train.device={device}", f"train.num_threads={threads}", "train.max_seconds=null",
        "train.checkpoint_interval=0", *overrides,
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    row = {"name": name, "overrides": " ".join(overrides), "wall_s": round(time.time() - t0, 1)}
    metrics = out / "best" / "metrics.json"
    if proc.returncode == 0 and metrics.is_file():
        row.update(json.loads(metrics.read_text()))
    else:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print a table sorted by dev perplexity."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=str(REPO / "experiments" / "tiny.yaml"))
    parser.add_argument("--run", action="append", default=[], help="'name: override override ...'")
    parser.add_argument("--runs-file", help="a file of such lines ('#' starts a comment)")
    parser.add_argument("--common", default="", help="overrides added to every run, e.g. 'train.amp=off'")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args(argv)
    lines = list(args.run)
    if args.runs_file:
        lines += [ln.split("#")[0].strip() for ln in Path(args.runs_file).read_text().splitlines()]
    specs = []
    for item in filter(None, lines):
        name, _, rest = item.partition(":")
        specs.append((name.strip(), [*args.common.split(), *rest.split()]))
    if not specs:
        parser.error("give at least one --run or a --runs-file")
    out_root = Path(tempfile.mkdtemp(prefix="lmlab-sweep-"))
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(
            pool.map(lambda s: run_one(s[0], s[1], args.base, args.device, out_root, args.threads), specs)
        )
    rows.sort(key=lambda r: r.get("dev_ppl", float("inf")))
    print(f"{'name':<14} {'dev ppl':>8} {'bits/B':>7} {'steps':>6} {'wall s':>7}  overrides")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<14} {'error':>8} {r['error']}")
        else:
            print(f"{r['name']:<14} {r['dev_ppl']:8.2f} {r['dev_bpb']:7.4f} {int(r['step']):6d} {r['wall_s']:7.1f}  "
                  f"{r['overrides']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
