"""lmplatform/prewarm.py without a Ray: the set-up hook a prestarted Train worker process runs, and how the runtime
environment is spelt. (The prestart itself, on a Ray that `lm train` starts, is checked in
tests/integration/test_cli.py's signal test: the ranks run in processes started before Train's controller.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmplatform import prewarm
from lmplatform.tracking import mlflow_client

_PROBE = """
import json, os, sys
from lmplatform import prewarm
before = "torch._dynamo" in sys.modules
prewarm.warm_up()
print(json.dumps({"before": before, "after": "torch._dynamo" in sys.modules, "warmed": prewarm.warmed,
                  "train": "lmplatform.train" in sys.modules, "mlflow": "mlflow" in sys.modules}))
"""


def _warm_up_in_a_new_process(env: dict[str, str]) -> dict[str, bool]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_up_does_the_workers_imports_and_opens_the_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client(uri).search_experiments()  # the driver created the store before
    seen = _warm_up_in_a_new_process({prewarm.TRACKING_ENV: uri})
    assert seen == {"before": False, "after": True, "warmed": True, "train": True, "mlflow": True}


def test_without_a_store_warm_up_only_imports() -> None:
    seen = _warm_up_in_a_new_process({})
    assert seen["warmed"] and seen["after"] and not seen["before"]


def test_a_warm_up_that_fails_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prewarm, "warmed", False)
    monkeypatch.setenv(prewarm.TRACKING_ENV, "nosuchscheme://nowhere")  # MLflow has no store for it
    prewarm.warm_up()  # a raising hook would make Ray kill the worker's process
    assert not prewarm.warmed


def test_the_spelling_covers_everything_train_puts_in_its_workers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # lm train sets it; Train propagates it
    own = {"LMLAB_X": "ü/1"}
    trains = WorkerGroup._get_worker_runtime_env({"env_vars": own})
    serialized = prewarm._train_worker_runtime_env(own)
    ours = json.loads(serialized)
    assert set(trains) == {"env_vars"} == set(ours)  # Train adds no other field to the workers' environment
    assert trains["env_vars"].items() <= ours["env_vars"].items()
    assert ours["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert '"LMLAB_X":"ü/1"' in serialized  # compact, unescaped, like the core worker


def test_the_store_is_opened_only_where_it_exists(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    # the driver may be creating it: opening it would race
    assert not prewarm._store_exists(f"sqlite:///{db}")
    db.write_bytes(b"x")
    assert prewarm._store_exists(f"sqlite:///{db}")
    assert prewarm._store_exists("http://127.0.0.1:5000")
    assert not prewarm._store_exists(f"file://{tmp_path}")


def test_switched_off_nothing_is_prestarted_and_nothing_earlier_is_handed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prewarm, "_prestarted", {"ray": ("an earlier run's", "01000000"), "runtime_env": {}})
    monkeypatch.setenv(prewarm.SWITCH_ENV, "0")
    assert prewarm.prestart_train_workers(1, None) is False
    assert prewarm.take_worker_runtime_env() is None
