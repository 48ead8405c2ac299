"""lmplatform/scaling.py against a real MLflow store: report() logs the chart, numbers and optima to a sweep's
parent run, and `lm sweep FILE --size-for MINUTES` answers from the newest finished study of that YAML."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from lmplatform.scaling import STUDY_JSON, STUDY_PNG, load_study, report, size_for_minutes, size_for_sweep
from lmplatform.tracking import mlflow_client

A_TRUE, B_TRUE = 2e4, 0.5


def trials(budgets=(60, 120, 240)) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for seconds in budgets:
        best = A_TRUE * seconds**B_TRUE
        for n in np.geomspace(best / 4, best * 4, 5):
            for seed in (1, 2):
                bpb = 1.8 + 0.05 * (math.log(n) - math.log(best)) ** 2 + rng.normal(0, 0.002)
                out.append({"trial_id": f"t{len(out)}", "status": "TERMINATED", "n_params": int(n),
                            "params": {"train.max_seconds": seconds, "train.seed": seed}, "dev_bpb": bpb})  # fmt: skip
    return out


def test_report_logs_chart_numbers_and_optima_to_the_parent_run(mlflow_store: str, tmp_path: Path) -> None:
    client = mlflow_client(mlflow_store)
    experiment = client.create_experiment("scaling-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    text = report(trials(), parent, client, tmp_path / "report")
    assert "power law: N_opt = " in text
    assert {a.path for a in client.list_artifacts(parent)} >= {STUDY_JSON, STUDY_PNG}
    metrics = client.get_run(parent).data.metrics
    assert metrics["scaling_optimum_params_120s"] == pytest.approx(A_TRUE * 120**B_TRUE, rel=0.05)
    assert metrics["scaling_power_law_b"] == pytest.approx(B_TRUE, abs=0.05)
    study = load_study(client, parent)  # what `--size-for` reads back
    n, (lo, hi) = size_for_minutes(study, 3)
    assert lo <= A_TRUE * 180**B_TRUE <= hi


def _study_yaml(tmp_path: Path, mlflow_store: str) -> tuple[Path, list[str]]:
    path = tmp_path / "scaling.yaml"
    path.write_text(
        "name: scal\n"
        "search:\n  train.max_seconds: {grid: [60, 120, 240]}\n  model.params: {grid: [300000, 600000]}\n"
        "ray: {num_workers: 0}\ntune: {study: scaling, scheduler: fifo}\n"
    )
    return path, [f"tracking.uri={mlflow_store}", f"ray.storage_path={tmp_path / 'runs'}"]


def test_size_for_answers_from_the_newest_finished_study_of_the_yaml(
    mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmplatform.cli import main
    from lmplatform.sweep_report import ROLE_TAG
    from lmplatform.tune import SWEEP_TAG, load_sweep

    path, overrides = _study_yaml(tmp_path, mlflow_store)
    with pytest.raises(
        Exception, match=r"no finished scaling study for .*scaling.yaml.*run it first with `lm sweep"
    ):
        size_for_sweep(path, overrides, 3)
    sweep = load_sweep(path, overrides)
    client = mlflow_client(mlflow_store)
    experiment = client.get_experiment_by_name("scal") or client.get_experiment(
        client.create_experiment("scal", artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    )
    tags = {SWEEP_TAG: sweep.path, ROLE_TAG: "sweep"}
    unfinished = client.create_run(experiment.experiment_id, tags=tags).info.run_id  # no scaling.json yet
    parent = client.create_run(experiment.experiment_id, tags=tags).info.run_id
    report(trials(), parent, client, tmp_path / "report")
    answer = size_for_sweep(path, overrides, 3)
    assert answer.startswith("for 3 minutes of training: about ") and f"MLflow run {parent}" in answer
    assert unfinished not in answer
    n = float(answer.split("about ")[1].split("K ")[0]) * 1e3
    assert n == pytest.approx(A_TRUE * 180**B_TRUE, rel=0.05)
    assert main(["sweep", str(path), *overrides, "--size-for", "3"]) == 0
    assert "for 3 minutes of training: about" in capsys.readouterr().out
    assert main(["sweep", str(path), *overrides, "tune.study=none", "--size-for", "3"]) == 2
    assert "is not a scaling study" in capsys.readouterr().err
    assert main(["sweep", str(path), *overrides, "--size-for", "0"]) == 2
    assert "give a positive number of minutes" in capsys.readouterr().err


@pytest.mark.ray
def test_a_scaling_sweep_ends_with_its_study_logged_to_the_parent_run(
    ray_cluster, tiny_overrides: list[str], mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmplatform.tune import run_sweep

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yaml = tmp_path / "study.yaml"
    yaml.write_text(
        "search:\n  train.max_seconds: {grid: [0.5]}\n  model.params: {grid: [15000, 25000, 40000]}\n"
        "tune: {study: scaling, scheduler: fifo}\n"
    )
    outcome = run_sweep(yaml, [*tiny_overrides, "train.max_steps=null", "train.max_seconds=1"], tmp_path)
    assert [t["status"] for t in outcome.trials] == ["TERMINATED"] * 3
    assert sorted(t["n_params"] for t in outcome.trials) == [
        pytest.approx(n, rel=0.02) for n in (15000, 25000, 40000)
    ]
    assert outcome.summary is not None and outcome.summary.startswith(
        "scaling study: dev_bpb against parameter"
    )
    client = mlflow_client(mlflow_store)
    assert {STUDY_JSON, STUDY_PNG} <= {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    study = load_study(client, outcome.parent_run_id)
    (entry,) = study["budgets"]
    assert entry["budget"] == 0.5 and sorted(entry["params"]) == sorted(t["n_params"] for t in outcome.trials)
    assert entry["bpb"] and entry["optimum_params"] is not None or "curve up" in (entry["note"] or "")
    assert study["power_law"] is None and "no power law" in " ".join(study["notes"])  # one budget
