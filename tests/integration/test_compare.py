"""lmplatform/compare.py through `lm runs compare`, on a real MLflow store in a temp dir: a sweep's parent run
expands to its trials, rows sorted by dev bits per byte, only the params that differ, prefixes, mistakes."""

from __future__ import annotations

import time

import pytest
from lmplatform.cli import main
from lmplatform.tracking import STEP_TAG, mlflow_client


def _run(client, experiment_id: str, name: str, params: dict, metrics: dict, tags: dict | None = None,
         parent: str | None = None, status: str = "FINISHED", history: int = 0) -> str:  # fmt: skip
    from mlflow.entities import Metric, Param, RunTag

    all_tags = dict(tags or {})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()]
        + [Metric("train_loss", 5.0 - s / 10, now, s) for s in range(1, history + 1)],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in all_tags.items()],
    )
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture
def sweep(mlflow_store: str, tmp_path) -> dict[str, str]:
    """A sweep's parent with four trials (finished, ASHA-killed, failed, still running), and a lone run."""
    client = mlflow_client(mlflow_store)
    exp = client.create_experiment("sweepy", artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    base = {"model.n_layer": 2, "train.batch_size": 16, "train.grad_accum_steps": 1, "model.block_size": 128,
            "ray.num_workers": 0, "ray.run_name": "x", "train.out_dir": "/tmp/x"}  # fmt: skip
    parent = _run(client, exp, "sweep-parent", {"tune.num_samples": 4}, {}, status="FINISHED")
    ids = {"parent": parent}
    ids["best"] = _run(client, exp, "trial-best", {**base, "optim.lr": 0.005, "train.out_dir": "/a"},
                       {"dev_bpb": 2.10, "val_bpb": 2.15, "val_ppl": 48.9, "tokens": 2_457_600},
                       {STEP_TAG: "1200", "best": "true"}, parent)  # fmt: skip
    ids["killed"] = _run(client, exp, "trial-killed", {**base, "optim.lr": 0.01, "train.out_dir": "/b"},
                         {"dev_bpb": 2.60, "tokens": 204_800}, {STEP_TAG: "100"}, parent, "KILLED")  # fmt: skip
    ids["failed"] = _run(client, exp, "trial-failed", {**base, "optim.lr": 0.1, "train.out_dir": "/c"}, {},
                         {}, parent, "FAILED")  # fmt: skip
    ids["running"] = _run(client, exp, "trial-running", {**base, "optim.lr": 0.002, "train.out_dir": "/d"},
                          {"dev_bpb": 2.30, "tokens": 40_960}, None, parent, "RUNNING", history=7)  # fmt: skip
    ids["lone"] = _run(client, exp, "lone", {**base, "optim.lr": 0.003, "model.n_layer": 4},
                       {"dev_bpb": 2.20, "val_bpb": 2.25, "val_ppl": 51.0}, {STEP_TAG: "900"})  # fmt: skip
    return ids


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_sweep_parent_expands_to_its_trials_sorted_by_dev_bpb(
    sweep: dict[str, str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "compare", sweep["parent"][:10], "--tracking-uri", mlflow_store]) == 0
    header, *rows = _lines(capsys)
    names = [next(w for w in row.split() if w.startswith("trial-")) for row in rows[:4]]
    assert names == ["trial-best", "trial-running", "trial-killed", "trial-failed"]  # no dev bpb: last
    assert header.split() == ["run", "id", "name", "status", "step", "tokens", "dev", "bpb", "val", "bpb", "val",
                              "ppl", "optim.lr"]  # fmt: skip
    best, running, killed, failed = rows[:4]
    assert best.startswith("*") and sweep["best"][:12] in best
    assert best.split()[3:] == ["FINISHED", "1,200", "2.46M", "2.1000", "2.1500", "48.90", "0.005"]
    assert running.split()[2:] == [
        "RUNNING",
        "7",
        "41K",
        "2.3000",
        "-",
        "-",
        "0.002",
    ]  # step from the history
    assert killed.split()[2:] == ["KILLED", "100", "205K", "2.6000", "-", "-", "0.01"]
    assert failed.split()[2:] == ["FAILED", "-", "-", "-", "-", "-", "0.1"]
    assert "4 runs (sweep " in rows[4] and "expanded to its trials), sorted by dev bits per byte" in rows[4]
    assert "sweep-parent" not in "\n".join(rows) and "train.out_dir" not in header


def test_sweeps_and_runs_mix_and_each_run_is_listed_once(
    sweep: dict[str, str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = [sweep["lone"], sweep["parent"], sweep["best"][:8]]  # the best trial also by its own prefix
    assert main(["runs", "compare", *refs, "--tracking-uri", mlflow_store]) == 0
    header, *rows = _lines(capsys)
    assert "sweep" in header.split() and "model.n_layer" in header.split()
    order = [r.split()[1] if r.startswith("*") else r.split()[0] for r in rows[:5]]
    expected = [sweep[k][:12] for k in ("best", "lone", "running", "killed", "failed")]
    assert order == expected
    lone = rows[1].split()
    assert lone[2] == "-" and lone[-2:] == ["4", "0.003"]  # no sweep; n_layer 4 differs from the trials' 2
    assert lone[4:6] == ["900", "1.84M"]  # no tokens metric (ended before a log line): 900 steps x 16 x 128
    assert rows[5].startswith("5 runs")


def test_a_run_without_children_is_itself_and_nothing_differs(
    sweep: dict[str, str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "compare", sweep["lone"], "--tracking-uri", mlflow_store]) == 0
    out = capsys.readouterr().out
    assert "lone" in out and "1 run, sorted by dev bits per byte" in out
    assert "no params differ between these runs" in out


def test_an_unknown_id_is_a_one_line_error(
    sweep: dict[str, str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "compare", sweep["lone"], "deadbeef00", "--tracking-uri", mlflow_store]) == 2
    err = capsys.readouterr().err
    assert "no MLflow run 'deadbeef00'" in err and len(err.strip().splitlines()) == 1
