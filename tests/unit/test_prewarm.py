"""lmplatform/prewarm.py without a Ray: the set-up hook a prestarted Train worker process runs, and how the runtime
environment is spelt. (The prestart itself, on a Ray that `lm train` starts, is checked in
tests/integration/test_cli.py's signal test: the ranks run in processes started before Train's controller.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lmplatform import prewarm

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


def test_warm_up_does_the_workers_imports_and_leaves_mlflow_to_the_driver() -> None:
    # rank 0 sends its metrics to the driver (tracking.MetricRelay): nothing in the worker imports MLflow
    seen = _warm_up_in_a_new_process({})
    assert seen == {"before": False, "after": True, "warmed": True, "train": True, "mlflow": False}


def test_a_warm_up_that_fails_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prewarm, "warmed", False)
    monkeypatch.setitem(sys.modules, "lmplatform.train", None)  # its import raises ImportError
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


def test_switched_off_nothing_is_prestarted_and_nothing_earlier_is_handed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prewarm, "_prestarted", {"ray": ("an earlier run's", "01000000"), "runtime_env": {}})
    monkeypatch.setenv(prewarm.SWITCH_ENV, "0")
    assert prewarm.prestart_train_workers(1) is False
    assert prewarm.take_worker_runtime_env() is None
