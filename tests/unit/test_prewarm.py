"""lmplatform/prewarm.py: the set-up hook a prestarted Train worker process runs (the prestart itself, on a Ray
that `lm train` starts, is checked in tests/integration/test_cli.py's signal test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lmplatform import prewarm
from lmplatform.tracking import mlflow_client


@pytest.fixture(autouse=True)
def _not_warmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prewarm, "warmed", False)


def test_warm_up_imports_the_workers_modules_and_opens_the_store_the_logger_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(prewarm.TRACKING_ENV, uri)
    prewarm.warm_up()
    assert prewarm.warmed
    assert {"torch._dynamo", "ray.train.torch", "lmplatform.train"} <= set(sys.modules)
    assert (tmp_path / "mlflow.db").is_file()  # the store exists (and its schema) before the first log
    # MLflow caches a store per URI: the client rank 0's logger builds later gets the one opened here
    store = mlflow_client(uri)._tracking_client.store
    assert mlflow_client(uri)._tracking_client.store is store


def test_a_warm_up_that_fails_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prewarm.TRACKING_ENV, "nosuchscheme://nowhere")  # MLflow has no store for it
    prewarm.warm_up()  # a raising hook would make Ray kill the worker's process
    assert not prewarm.warmed


def test_nothing_prestarted_means_trains_runtime_env_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prewarm.SWITCH_ENV, "0")
    assert prewarm.prestart_train_workers(1, None) is False
    assert prewarm.worker_runtime_env() is None
