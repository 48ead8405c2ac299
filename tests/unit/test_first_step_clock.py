"""lmplatform/cli.py's clock for "time from command start to the first training step" (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's start from /proc")
def test_the_first_step_clock_starts_with_the_process_not_after_its_imports() -> None:
    """The printed "time from command start" counts the interpreter's start and the imports (2-5 s on 2 cores),
    not only what comes after them: the start is read from the process's own record, not taken when the command
    runs (the old code fell back to "now", here at least a second after the process's first statement)."""
    code = (
        "import time; first = time.time(); time.sleep(1.0)\n"
        "from lmplatform.cli import _process_start\n"
        "print(first, _process_start())"
    )
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, started = map(float, out.split())
    # starttime has 10-ms ticks, and the reading can be preempted
    assert before - 0.05 <= started <= first + 0.05


def test_the_startup_bench_reads_what_lm_train_prints_and_keeps_its_runs_out_of_the_users_store(
    tmp_path,
) -> None:
    from bench.startup import TRAINING, command, first_step_s, summary

    assert first_step_s("done\ntime from command start to the first training step: 17.9s\n") == 17.9
    assert first_step_s("val perplexity 1870.72\n") is None
    line = (
        "23:21:22 training tiny: 658,944 parameters (396,800 non-embedding), 2048 tokens/step, Muon + AdamW"
    )
    assert TRAINING.search(line) and not TRAINING.search("--- sample: training is over")
    cmd = command(tmp_path)
    assert f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}" in cmd and cmd[cmd.index("--out") + 1] == str(
        tmp_path / "run"
    )
    assert summary([{"first_step_s": v} for v in (14.0, 12.0, 19.0)]) == {
        "runs": [14.0, 12.0, 19.0], "median_s": 14.0, "min_s": 12.0, "max_s": 19.0,
    }  # fmt: skip


def test_the_share_bench_reads_lm_trains_result_line_and_takes_ratios_within_rounds() -> None:
    from bench.ray_share import final_line, summarise

    out = (
        "ray run: /tmp/x (best checkpoint: /tmp/x/best)\n"
        "tiny: step 601, 60.0s of training -> val perplexity 48.83, 2.1788 bits/byte (val loss 3.8884)\n"
    )
    assert final_line(out) == {"steps": 601, "trained_s": 60.0, "val_ppl": 48.83, "val_bpb": 2.1788}
    assert final_line("Traceback (most recent call last):\n") is None

    def run(steps: int) -> dict:
        return {"steps": steps, "val_ppl": 50.0, "val_bpb": 2.2, "first_step_s": 15.0}

    rounds = [  # the second round is slow for all three: its ratios still count, its raw steps do not mislead
        {"ray": run(600), "ray, LMLAB_LEAN=0": run(540), "local": run(625)},
        {"ray": run(300), "ray, LMLAB_LEAN=0": run(270), "local": run(310)},
        {"ray": run(610), "ray, LMLAB_LEAN=0": run(550), "local": run(620)},
    ]
    modes = summarise(rounds)
    assert modes["ray"]["share_per_round"] == [0.96, 0.968, 0.984]
    assert modes["ray"]["median_share"] == 0.968
    assert modes["ray, LMLAB_LEAN=0"]["median_share"] == 0.871
    assert modes["local"]["median_steps"] == 620 and "median_share" not in modes["local"]


def test_the_bench_names_an_unknown_section(capsys) -> None:
    import pytest

    from bench.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "train,shares"])
    assert exit_info.value.code == 2
    assert (
        "--only train,shares: unknown shares (known: fsdp, generate, mfu, serve, share, startup, train)"
        in (capsys.readouterr().err)
    )
