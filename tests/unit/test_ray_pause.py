"""bench/ray_pause.py's pieces: whose processes it may touch, how it reads progress, and how it pairs phases."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from bench.procs import alive, descendants
from bench.ray_pause import hold, last_step, pair_ratios


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rindex(")") + 2]


def test_descendants_are_the_whole_tree_under_a_process_and_nothing_else() -> None:
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    tree = subprocess.Popen(["sh", "-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"])
    found: set[int] = set()
    try:
        deadline = time.monotonic() + 10
        while len(found) < 3 and time.monotonic() < deadline:  # a sleep, an sh, and that sh's sleep
            time.sleep(0.05)
            found = descendants(tree.pid)
        assert len(found) == 3
        assert tree.pid not in found and outside.pid not in found and os.getpid() not in found
    finally:
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for p in (tree, outside):
            p.kill()
            p.wait()


def _settled_state(pid: int, want: str) -> str:
    """The process's state once it is one of ``want`` (signals take effect asynchronously), or after 5 s."""
    deadline = time.monotonic() + 5
    while _state(pid) not in want and time.monotonic() < deadline:
        time.sleep(0.01)
    return _state(pid)


def test_hold_pauses_and_resumes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        hold([proc.pid], "stop", True)
        assert _settled_state(proc.pid, "T") == "T"
        hold([proc.pid], "stop", False)
        assert _settled_state(proc.pid, "SR") in "SR"
        hold([proc.pid], "nice", True)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
    finally:
        proc.kill()


def test_last_step_reads_lm_progress_lines_only() -> None:
    log = (
        "23:52:14 training tiny: 658,944 parameters\n"
        "23:52:15 step      5 | loss 7.1 | lr 1.0e-04 |   20.1k tok/s | 8.0 MiB\n"
        "23:52:16 step     10 | dev loss 6.59 | dev ppl 729.07\n"
        "23:52:17 step     15 | loss 6.9 | lr 2.0e-04 |   21.0k tok/s | 8.0 MiB\n"
    )
    assert last_step(log) == 15
    assert last_step("23:52:14 training tiny\n") is None


def test_pair_ratios_divide_each_running_phase_by_its_neighbour() -> None:
    assert pair_ratios([9.0, 12.0], [10.0, 12.0, 13.0]) == [0.9, 1.0]
    assert pair_ratios([9.0], [0.0]) == []


def test_alive_is_false_for_a_zombie_and_for_a_pid_that_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert alive(os.getpid())
    deadline = time.monotonic() + 10
    while alive(child.pid) and time.monotonic() < deadline:  # exited, not reaped: a zombie
        time.sleep(0.02)
    assert not alive(child.pid) and _state(child.pid) == "Z"
    child.wait()
    assert not alive(child.pid)  # reaped: no /proc entry
