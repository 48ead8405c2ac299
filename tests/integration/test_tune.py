"""lmplatform/tune.py: real Ray Tune sweeps over the toy experiment, tracked in a real MLflow store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lmplatform.sweep_report import COLUMNS, ROLE_TAG
from lmplatform.tracking import BEST_ALIAS, mlflow_client, registered_model_name
from lmplatform.train import FAIL_ENV
from lmplatform.tune import PARENT_TAG, TRIAL_TAG, run_sweep

from lm.checkpoint import read_run_record

pytestmark = pytest.mark.ray
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # one test must not flip the next (see RAY_NOTES)


def _sweep_yaml(tmp_path: Path, search: str, tune: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"search:\n{search}\ntune: {tune}\n")
    return path


def _runs(client, experiment: str = "itest") -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def _children(client, parent: str) -> list:
    return [r for r in _runs(client) if r.data.tags.get(PARENT_TAG) == parent]


def test_a_sweep_tracks_every_trial_stops_the_loser_and_registers_the_best(
    ray_cluster, tiny_overrides: list[str], mlflow_store: str, tmp_path: Path
) -> None:
    # a clear loser: at lr 1e-7 the model does not move, so ASHA stops it at its first rung (step 5 = 1,280 tokens);
    # each trial trains on one Ray Train worker (the other tests: local mode), ASHA counts the loop's tokens
    yaml = _sweep_yaml(
        tmp_path,
        "  optim.lr: {grid: [1.0e-2, 1.0e-7]}",
        "{time_attr: tokens, grace_period: 1280, reduction_factor: 2}",
    )
    live = io.StringIO()
    started = time.monotonic()
    args = [
        *tiny_overrides,
        "optim.min_lr=0",
        "train.eval_interval=5",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
    ]
    outcome = run_sweep(yaml, args, tmp_path, live)
    print(f"2-trial sweep: {time.monotonic() - started:.1f}s")

    trials = {t["params"]["optim.lr"]: t for t in outcome.trials}
    good, loser = trials[1e-2], trials[1e-7]
    assert all(list(t) == list(COLUMNS) for t in outcome.trials)
    assert good["status"] == "TERMINATED" and good["step"] == 20 and good["tokens"] == 20 * 8 * 32
    assert (
        loser["status"] == "KILLED"
        and loser["step"] == 5
        and loser["tokens"] == 1280
        and loser["val_bpb"] is None
    )
    assert good["n_params"] == loser["n_params"] == 22368
    assert good["dev_bpb"] < loser["dev_bpb"] and good["val_bpb"] > 0 and good["val_perplexity"] > 1
    assert good["checkpoint"] and Path(good["checkpoint"], "model.safetensors").is_file()
    assert outcome.best is good and not outcome.interrupted

    # the live table showed the trials with the varied key, and both outcomes
    shown = live.getvalue()
    assert (
        "optim.lr" in shown and "TERMINATED" in shown and "KILLED" in shown and "Configuration" not in shown
    )

    client = mlflow_client(mlflow_store)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "sweep"
    assert parent.data.params["search.optim.lr"] == "grid [0.01, 1e-07]"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.tags["lmlab.best_trial"] == good["trial_id"]
    assert parent.data.metrics["best_dev_bpb"] == pytest.approx(good["dev_bpb"])
    assert parent.data.metrics["trials_killed"] == 1 and parent.data.metrics["trials_terminated"] == 1

    children = {r.data.tags[TRIAL_TAG]: r for r in _children(client, parent.info.run_id)}
    assert set(children) == {good["trial_id"], loser["trial_id"]}
    won, lost = children[good["trial_id"]], children[loser["trial_id"]]
    assert won.info.run_id == good["run_id"] and lost.info.run_id == loser["run_id"]
    # each child carries what a `make train` run logs, and ends with a final status
    assert won.info.status == "FINISHED" and lost.info.status == "KILLED"
    assert won.data.params["optim.lr"] == "0.01" and lost.data.params["optim.lr"] == "1e-07"
    assert "val_bpb" in won.data.metrics and "lmlab.device" in won.data.tags
    assert "dev_loss" in lost.data.metrics and "val_bpb" not in lost.data.metrics  # its last metrics stay
    assert "stopped by the ASHA scheduler at step 5" in lost.data.tags["mlflow.note.content"]
    assert won.data.tags.get("best") == "true" and "best" not in lost.data.tags
    # its first dev evaluation is what ASHA judged; its worker may evaluate once more before Tune's stop lands
    assert [m.step for m in client.get_metric_history(lost.info.run_id, "dev_loss")][0] == 5

    # the best trial's best checkpoint is the newest registered version, with alias best
    name = registered_model_name("itest")
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == won.info.run_id and outcome.model_version == str(version.version)
    assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == str(version.version)

    # the parent's artifacts: tables, best trial, plots (valid PNGs, one series per trial)
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.md", "best_trial.json", "plots.json", "sweep.json"} <= files
    assert {"dev_loss_curves.png", "bpb_vs_params.png"} <= files
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "dl")))
    for png in ("dev_loss_curves.png", "bpb_vs_params.png"):
        assert (local / png).read_bytes()[:8] == PNG_MAGIC
    series = json.loads((local / "plots.json").read_text())
    curves = series["dev_loss_curves"]
    assert len(curves) == 2 and len(curves[f"{good['trial_id']} (lr=0.01)"]) == 4  # steps 5, 10, 15, 20
    assert sum(len(points) for points in series["bpb_vs_params"].values()) == 2
    csv_lines = (local / "trials.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial_id,status,optim.lr,n_params") and len(csv_lines) == 3
    best = json.loads((local / "best_trial.json").read_text())
    assert best["trial_id"] == good["trial_id"] and best["config"]["optim"]["lr"] == 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failing trial asks for CUDA where there is none")
def test_a_failing_trial_is_retried_and_reported_without_sinking_the_sweep(
    ray_cluster, tiny_overrides: list[str], mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every trial fails once at step 13 (the driver's testing aid) and is retried from its step-10 checkpoint;
    # the cuda trial fails at every attempt (no GPU), which only the running trial can find out
    monkeypatch.setenv(FAIL_ENV, "13")
    yaml = _sweep_yaml(tmp_path, "  train.device: {grid: [cpu, cuda]}", "{scheduler: fifo, max_failures: 1}")
    outcome = run_sweep(yaml, tiny_overrides, tmp_path, io.StringIO())

    trials = {t["params"]["train.device"]: t for t in outcome.trials}
    assert trials["cpu"]["status"] == "TERMINATED" and trials["cpu"]["step"] == 20
    assert trials["cuda"]["status"] == "FAILED"
    assert outcome.best is trials["cpu"]
    run_dir = Path(trials["cpu"]["checkpoint"]).parent
    assert (run_dir / ".lmlab-injected-failure").read_text() == "13"  # it did fail once, then resumed
    assert read_run_record(run_dir)["status"] == "finished"

    client = mlflow_client(mlflow_store)
    children = _children(client, outcome.parent_run_id)
    assert len(children) == 2  # retries reopen the trial's child run, never a second one
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in children}
    ok, failed = by_trial[trials["cpu"]["trial_id"]], by_trial[trials["cuda"]["trial_id"]]
    assert ok.info.status == "FINISHED" and "lmlab.failure" not in ok.data.tags
    assert failed.info.status == "FAILED" and "CUDA" in failed.data.tags["lmlab.failure"]
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "dev_loss")] == [10, 20]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"


def test_a_killed_sweep_driver_resumes_without_rerunning_or_duplicating(
    tiny_overrides: list[str], mlflow_store: str, tmp_path: Path
) -> None:
    yaml = _sweep_yaml(tmp_path, "  optim.lr: {grid: [1.0e-2, 5.0e-3, 3.0e-3]}", "{scheduler: fifo}")
    args = [*tiny_overrides, "ray.address=local", "train.max_steps=150", "train.log_interval=50",
            "train.eval_interval=50", "train.checkpoint_interval=50"]  # fmt: skip
    command = [sys.executable, "-m", "lmplatform", "sweep", str(yaml), *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    trials_dir = tmp_path / "runs" / "itest-sweep" / "trials"

    def finished() -> list[Path]:
        return [d for d in trials_dir.glob("train-*") if read_run_record(d).get("status") == "finished"]

    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not finished() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0].decode()
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9` would
        proc.wait(timeout=30)
    finally:
        with_group_gone(proc.pid)
    done_before = {d.name: (d / "run.json").read_text() for d in finished()}
    assert 1 <= len(done_before) < 3
    client = mlflow_client(mlflow_store)
    histories = {
        r.data.tags[TRIAL_TAG]: len(client.get_metric_history(r.info.run_id, "train_loss"))
        for r in _runs(client)
        if TRIAL_TAG in r.data.tags
    }

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert out.count("TERMINATED") >= 3

    # finished trials were not trained again: their run directories are untouched
    assert {name: (trials_dir / name / "run.json").read_text() for name in done_before} == done_before
    parents = [r for r in _runs(client) if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(client, parents[0].info.run_id)
    assert len(children) == 3 and len({r.data.tags[TRIAL_TAG] for r in children}) == 3  # none duplicated
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:
        trial = r.data.tags[TRIAL_TAG]
        if f"train-{trial}" in done_before:  # no metric logged twice
            assert len(client.get_metric_history(r.info.run_id, "train_loss")) == histories[trial] == 3


def with_group_gone(pgid: int) -> None:
    """SIGKILL whatever is left of the process group this test started (Ray's own processes of that driver)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_final_pass_keeps_the_end_time_of_a_trial_already_stopped(mlflow_store: str) -> None:
    """A trial ASHA stopped early keeps the duration it ran (the UI's Duration column), not the sweep's."""
    from lmplatform.sweep_report import _end_children

    client = mlflow_client(mlflow_store)
    experiment = client.create_experiment("ends")
    stopped, running = (client.create_run(experiment).info for _ in range(2))
    client.set_terminated(stopped.run_id, status="KILLED", end_time=stopped.start_time + 1500)
    trials = [
        {"run_id": stopped.run_id, "status": "KILLED", "step": 5, "dev_loss": 4.0},
        {"run_id": running.run_id, "status": "TERMINATED", "step": 20, "dev_loss": 3.0},
    ]
    _end_children(client, None, trials)  # type: ignore[arg-type]
    kept = client.get_run(stopped.run_id).info
    assert kept.status == "KILLED" and kept.end_time == stopped.start_time + 1500
    assert client.get_run(running.run_id).info.status == "FINISHED"
