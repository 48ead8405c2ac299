"""What Ray's other processes cost a `make train` worker: pause them, let them run, compare the step rates.

    python -m bench.ray_pause                                   # all of them, 80 s of training, 5-s phases
    python -m bench.ray_pause --only 'raylet|gcs_server'        # just these (a regex over command lines)
    python -m bench.ray_pause --mode nice                       # nice 19 instead of a pause (also: idle)

Runs ``lm train experiments/tiny.yaml`` on a Ray of its own (``ray.address=local``), its progress every 5 steps.
Once the worker trains, it alternates phases of ``--phase`` seconds: in one, every other process of that Ray
(the GCS, the raylet, agents, monitors, Ray Train's helper actors) is paused with SIGSTOP
(or, with ``--mode``, only given nice 19 or SCHED_IDLE); in the next it runs as usual. The worker's steps per
second come from its own log file, which it writes itself, so nothing paused is on the way. Each pair of
neighbouring phases gives one ratio, running / paused, so the machine's drift over a minute cancels out.

Only processes under the ``lm train`` this script starts are touched, and every one is resumed (SIGCONT) before
it exits, also on Ctrl-C. Nice 0 and SCHED_OTHER are put back too where the user may (root may; others may not
lower a nice value), else those processes keep the low priority for the rest of that run, which ends with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.procs import cmdline, descendants

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step\s+(\d+) \|.*tok/s")
WORKER = "ray::RayTrainWorker"


def last_step(text: str) -> int | None:
    """The last training step a progress log shows."""
    steps = [int(m.group(1)) for m in STEP.finditer(text)]
    return steps[-1] if steps else None


def pair_ratios(running: list[float], paused: list[float]) -> list[float]:
    """running / paused for each neighbouring pair of phases (rates in steps/s)."""
    return [r / p for p, r in zip(paused, running) if p > 0]


def _threads(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return []


def hold(pids: list[int], mode: str, on: bool) -> None:
    """Pause (``on``) or resume ``pids``: SIGSTOP/SIGCONT, nice 19/0 per thread, or SCHED_IDLE/SCHED_OTHER."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if mode == "stop":
                os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)
                continue
            for tid in _threads(pid):
                with contextlib.suppress(OSError):
                    if mode == "nice":
                        os.setpriority(os.PRIO_PROCESS, tid, 19 if on else 0)
                    else:
                        policy = os.SCHED_IDLE if on else os.SCHED_OTHER
                        os.sched_setscheduler(tid, policy, os.sched_param(0))


def _worker_log(session: Path, since: float) -> Path | None:
    for log in sorted(session.glob("ray/session_*/logs/worker-*"), key=os.path.getmtime, reverse=True):
        with contextlib.suppress(OSError):
            if log.stat().st_mtime > since and last_step(log.read_text(errors="replace")) is not None:
                return log
    return None


@contextlib.contextmanager
def _training(seconds: int, temp: Path) -> Iterator[subprocess.Popen[bytes]]:
    out = temp / "run"
    cmd = [sys.executable, "-m", "lmplatform", "train", str(ROOT / "experiments/tiny.yaml"),
           f"train.max_seconds={seconds}", "train.log_interval=5", "train.checkpoint_interval=100000",
           "ray.address=local", "tracking.enabled=false", "--out", str(out), "--restart", "--no-sample"]  # fmt: skip
    env = {**os.environ, "RAY_TMPDIR": str(temp)}  # its own session directory: the log is found there
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()


def measure(seconds: int, phase: float, mode: str, only: str) -> tuple[list[float], list[float], list[str]]:
    """Step rates (running, paused) per phase and the command lines of the processes held."""
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="lmlab-pause-", dir="/tmp") as tmp,
        _training(seconds, Path(tmp)) as proc,
    ):
        log = None
        while log is None:
            if proc.poll() is not None:
                raise SystemExit(f"ray_pause: lm train exited with {proc.returncode} before its first step")
            time.sleep(0.5)
            log = _worker_log(Path(tmp), started)
        time.sleep(2 * phase)  # past the first steps' warm-up
        held = [p for p in descendants(proc.pid) if WORKER not in cmdline(p) and re.search(only, cmdline(p))]
        names = sorted({os.path.basename(cmdline(p).split(" ")[0]) for p in held})
        rates: dict[bool, list[float]] = {True: [], False: []}
        paused = False
        try:
            with log.open(errors="replace") as f:
                f.read()
                latest = mark = None  # (step, when its line appeared): rates between lines, not phase edges
                edge = time.monotonic()
                while proc.poll() is None and time.time() - started < seconds + 10:
                    time.sleep(0.05)
                    step = last_step(f.read())
                    if step is not None:
                        latest = (step, time.monotonic())
                    if time.monotonic() - edge < phase or latest is None:
                        continue
                    if mark is not None:
                        if latest[0] > mark[0]:
                            rates[paused].append((latest[0] - mark[0]) / (latest[1] - mark[1]))
                        paused = not paused
                        hold(held, mode, paused)
                    mark, edge = latest, time.monotonic()
        finally:
            hold(held, mode, False)
    return rates[False], rates[True], names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=80, help="training budget (default 80)")
    ap.add_argument("--phase", type=float, default=5.0, help="seconds per phase (default 5)")
    ap.add_argument("--mode", choices=("stop", "nice", "idle"), default="stop", help="how to hold them back")
    ap.add_argument("--only", default="", help="a regex: hold only the processes whose command line matches")
    args = ap.parse_args(argv)
    running, paused, names = measure(args.seconds, args.phase, args.mode, args.only)
    ratios = pair_ratios(running, paused)
    print(f"held ({args.mode}): {', '.join(names) or 'nothing'}")
    print(f"steps/s while held:   {' '.join(f'{r:.1f}' for r in paused)}")
    print(f"steps/s while running: {' '.join(f'{r:.1f}' for r in running)}")
    if not ratios:
        print("no complete pair of phases: train longer (--seconds)", file=sys.stderr)
        return 1
    print(
        f"running / held, per pair: {' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
