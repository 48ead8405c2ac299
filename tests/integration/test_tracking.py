"""lmplatform/tracking.py against a real MLflow SQLite store: run identity, end states, the registry, views.

The checkpoints here are real (a seeded toy model saved by lm.checkpoint) but untrained, so these tests pay
only for MLflow; the training loop's side is in test_train.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lmplatform.tracking import (
    BEST_ALIAS,
    DEVICE_TAG,
    FAILURE_TAG,
    NOTE_TAG,
    RUN_ID_FIELD,
    MetricInbox,
    MetricLogger,
    RunTracker,
    TrackingError,
    download_checkpoint,
    list_runs,
    mlflow_client,
    plot_loss_curve,
    registered_model_name,
    show_run,
    start_run,
)

from lm.checkpoint import WEIGHTS, read_run_record, save_checkpoint, update_run_record
from lm.model import TransformerLM
from lm.tokenizer import train_tokenizer

MODEL = registered_model_name("itest")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    return train_tokenizer([small_text], vocab_size=300).save(
        tmp_path_factory.mktemp("tok") / "tokenizer.json"
    )


@pytest.fixture
def make_checkpoint(make_config, tokenizer_file: Path, tmp_path: Path) -> Callable[..., Path]:
    """A real checkpoint directory: seeded toy weights plus a metrics.json with the given numbers."""
    cfg, _ = make_config()

    def make(name: str, seed: int, **metrics: float) -> Path:
        torch.manual_seed(seed)
        model = TransformerLM(cfg.model)
        return save_checkpoint(tmp_path / "ckpts" / name, model, cfg, tokenizer_file, metrics)

    return make


def _metrics(step: int, dev_bpb: float, val_bpb: float = 2.5) -> dict[str, float]:
    return {"step": step, "dev_loss": dev_bpb * 2, "dev_ppl": 20.0, "dev_bpb": dev_bpb,
            "val_loss": val_bpb * 2, "val_ppl": 30.125, "val_bpb": val_bpb}  # fmt: skip


def _start(make_config, run_dir: Path, resume: bool = True, **kwargs) -> RunTracker:
    cfg, pcfg = make_config()
    tracker = start_run(cfg, pcfg, str(run_dir), launcher="local", resume=resume, **kwargs)
    assert tracker is not None
    return tracker


def _run(tracker: RunTracker):
    return tracker.client.get_run(tracker.run_id)


def test_a_run_is_reopened_only_by_the_id_its_run_directory_records(make_config, tmp_path: Path) -> None:
    local, ray_dir = tmp_path / "runs" / "itest-local", tmp_path / "runs" / "itest"
    first = _start(make_config, local)
    with first.track():
        pass
    assert read_run_record(local)[RUN_ID_FIELD] == first.run_id

    again = _start(make_config, local)  # the same directory, its record names the run: reopened
    assert again.resumed and again.run_id == first.run_id
    assert _run(again).info.status == "RUNNING"
    with again.track():
        pass

    cfg, pcfg = make_config()
    on_ray = start_run(cfg, pcfg, str(ray_dir), launcher="ray")  # Ray's run directory: another MLflow run
    assert on_ray is not None and on_ray.run_id != first.run_id and not on_ray.resumed
    assert read_run_record(ray_dir)[RUN_ID_FIELD] == on_ray.run_id
    on_ray.end("FINISHED")

    # the run.json is gone (a new run in the same path): the lmlab.run_dir tag alone never reopens a run
    (local / "run.json").unlink()
    fresh = _start(make_config, local)
    assert not fresh.resumed and fresh.run_id != first.run_id
    assert _run(fresh).data.tags["lmlab.run_dir"] == str(local)  # kept for display
    fresh.end("FINISHED")
    assert fresh.client.get_run(first.run_id).info.status == "FINISHED"  # the old run is left alone

    restarted = _start(make_config, local, resume=False)  # --restart: new run, recorded
    assert restarted.run_id != fresh.run_id
    assert read_run_record(local)[RUN_ID_FIELD] == restarted.run_id
    (local / "run.json").unlink()  # what the loop's reset() does to run.json on --restart
    restarted.hooks().on_start()
    assert read_run_record(local)[RUN_ID_FIELD] == restarted.run_id
    restarted.end("FINISHED")

    update_run_record(local, **{RUN_ID_FIELD: "0" * 32})  # a run this store does not have
    unknown = _start(make_config, local)
    assert not unknown.resumed and read_run_record(local)[RUN_ID_FIELD] == unknown.run_id
    unknown.end("FINISHED")


def test_a_failure_while_the_run_starts_ends_it_failed_with_the_reason(make_config, tmp_path: Path) -> None:
    cfg, pcfg = make_config()
    with pytest.raises(Exception):  # noqa: B017 (whatever MLflow raises for a missing file)
        start_run(
            cfg, pcfg, str(tmp_path / "run"), launcher="local", tokenizer_path=tmp_path / "missing.json"
        )
    client = mlflow_client(pcfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG].startswith("while starting: ")
    assert "missing.json" in run.data.tags[FAILURE_TAG]
    assert run.data.tags[NOTE_TAG] == f"failed: {run.data.tags[FAILURE_TAG]}"


def test_track_ends_finished_killed_or_failed_never_running(make_config, tmp_path: Path) -> None:
    ok = _start(make_config, tmp_path / "ok")
    with ok.track():
        pass
    interrupted = _start(make_config, tmp_path / "interrupted")
    with interrupted.track():
        interrupted.status = "KILLED"  # the loop returned with interrupted=True
    ctrl_c = _start(make_config, tmp_path / "ctrl-c")
    with pytest.raises(KeyboardInterrupt), ctrl_c.track():
        raise KeyboardInterrupt
    broken = _start(make_config, tmp_path / "broken")
    with pytest.raises(ValueError), broken.track():
        raise ValueError("boom\n  more detail\nthe last line")
    explicit = _start(make_config, tmp_path / "explicit")
    with pytest.raises(RuntimeError), explicit.track():
        explicit.fail("not enough CPUs for 4 workers")  # a launcher's own summary wins over the exception's
        raise RuntimeError("ray said no")

    status = {t: _run(t).info.status for t in (ok, interrupted, ctrl_c, broken, explicit)}
    assert list(status.values()) == ["FINISHED", "KILLED", "KILLED", "FAILED", "FAILED"]
    tags = _run(broken).data.tags
    assert tags[FAILURE_TAG] == "ValueError: boom ... the last line"
    assert tags[NOTE_TAG] == "failed: ValueError: boom ... the last line"
    assert _run(explicit).data.tags[FAILURE_TAG] == "not enough CPUs for 4 workers"
    assert FAILURE_TAG not in _run(ok).data.tags

    resumed = _start(make_config, tmp_path / "broken")  # a later attempt that succeeds clears the failure
    with resumed.track():
        pass
    tags = _run(resumed).data.tags
    assert resumed.run_id == broken.run_id and _run(resumed).info.status == "FINISHED"
    assert FAILURE_TAG not in tags and tags[NOTE_TAG].startswith("resumed after: ValueError")


def test_the_device_tag_is_only_the_device_the_loop_used(make_config, tmp_path: Path) -> None:
    cfg, pcfg = make_config("ray.use_gpu=true", "train.device=cuda")
    tracker = start_run(cfg, pcfg, str(tmp_path / "runs" / "itest"), launcher="ray")
    assert tracker is not None
    assert DEVICE_TAG not in _run(tracker).data.tags  # asked for, not used yet: nothing recorded
    with tracker.track():
        tracker.set_device(torch.device("cpu"))
    assert _run(tracker).data.tags[DEVICE_TAG] == "cpu"


def test_registered_versions_keep_their_weights_and_best_follows_dev_bpb(
    make_config, make_checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmplatform.tracking")
    cfg, _ = make_config()
    run_dir = tmp_path / "run"
    ckpt1 = make_checkpoint("a", 1, **_metrics(10, dev_bpb=2.25))
    weights1 = (ckpt1 / WEIGHTS).read_bytes()

    first = _start(make_config, run_dir)
    with first.track():
        first.finish(cfg, ckpt1, ckpt1, trained_steps=10)
    assert first.model_version == "1"
    assert (
        first.alias_note
        == "alias best -> version 1 (dev bits/byte 2.2500, the first version to hold the alias)"
    )
    client = first.client
    v1 = client.get_model_version(MODEL, "1")
    assert v1.tags["lmlab.artifact_path"] == "checkpoints/best-step-10"
    assert v1.source.startswith("models:/m-")  # a logged pyfunc MLflow Model (lmplatform.pyfunc)
    assert {k: float(v1.tags[k]) for k in ("dev_bpb", "val_bpb", "val_ppl")} == {
        "dev_bpb": 2.25, "val_bpb": 2.5, "val_ppl": 30.125,
    }  # fmt: skip
    assert v1.description.startswith("val perplexity 30.12, 2.5000 bits/byte, dev 2.2500 bits/byte, step 10")

    # a 0-step resume registers nothing, and neither does an opted-out run
    again = _start(make_config, run_dir)
    with again.track():
        again.finish(cfg, ckpt1, ckpt1, trained_steps=0)
    assert again.model_version is None
    assert "not registered: this invocation trained no steps" in caplog.text

    # the same run resumed, a new best at the SAME step (retrained after a crash): a new path, v1 untouched;
    # its dev bpb is better (its val bpb worse): the alias moves, on dev
    ckpt2 = make_checkpoint("b", 2, **_metrics(10, dev_bpb=2.21, val_bpb=2.6))
    resumed = _start(make_config, run_dir)
    assert resumed.run_id == first.run_id
    with resumed.track():
        resumed.finish(cfg, ckpt2, ckpt2, trained_steps=5)
    assert resumed.model_version == "2"
    assert resumed.alias_note == "alias best -> version 2 (dev bits/byte 2.2100 < 2.2500 of version 1)"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.source != v1.source and v2.tags["lmlab.artifact_path"].startswith("checkpoints/best-step-10-")
    assert (
        download_checkpoint(first.uri, f"models:/{MODEL}/1", tmp_path / "v1") / WEIGHTS
    ).read_bytes() == weights1

    # a later, worse run: registered, alias stays, and saying why
    ckpt3 = make_checkpoint("c", 3, **_metrics(20, dev_bpb=2.30, val_bpb=2.2))
    worse = _start(make_config, tmp_path / "other-run")
    with worse.track():
        worse.finish(cfg, ckpt3, ckpt3, trained_steps=20)
    assert worse.model_version == "3"
    assert worse.alias_note == "alias best stayed on version 2 (dev bits/byte 2.2100 <= 2.3000 of version 3)"
    assert str(client.get_model_version_by_alias(MODEL, BEST_ALIAS).version) == "2"
    assert "alias best stayed on version 2" not in caplog.text  # printed once, by the launcher's summary

    cfg_off, pcfg_off = make_config("tracking.register_model=false")
    opted_out = start_run(cfg_off, pcfg_off, str(tmp_path / "smoke"), launcher="local")
    assert opted_out is not None
    with opted_out.track():
        opted_out.finish(cfg_off, ckpt3, ckpt3, pcfg_off.tracking.register_model, trained_steps=20)
    assert opted_out.model_version is None
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 3


def test_loss_curve_plots_train_and_dev_loss(make_config, tmp_path: Path) -> None:
    tracker = _start(make_config, tmp_path / "run")
    logger = MetricLogger(tracker.uri, tracker.run_id)
    png = tmp_path / "curve.png"
    logger.log(10, {"dev_loss": 3.0, "dev_ppl": 20.0, "dev_bpb": 2.2})
    assert plot_loss_curve(tracker.client, tracker.run_id, png)  # dev alone is already a curve
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tracker.end("FINISHED")


def test_views_and_download_say_where_everything_is(make_config, make_checkpoint, tmp_path: Path) -> None:
    cfg, pcfg = make_config()
    run_dir = tmp_path / "run"
    best = make_checkpoint("best", 1, **_metrics(10, dev_bpb=2.25))
    final = make_checkpoint("final", 2, **_metrics(20, dev_bpb=2.3))
    tracker = _start(make_config, run_dir)
    MetricLogger(tracker.uri, tracker.run_id).log(20, {"train_loss": 4.0, "dev_loss": 4.2, "dev_ppl": 66.5})
    update_run_record(run_dir, status="finished", step=20)
    with tracker.track():
        tracker.set_device("cpu")
        tracker.finish(cfg, final, best, trained_steps=20)
    uri = tracker.uri

    table = list_runs(uri, "itest")
    assert "dev ppl" in table.splitlines()[0] and "66.50" in table

    shown = show_run(uri, tracker.run_id[:10])
    root = _run(tracker).info.artifact_uri
    assert f"run dir         {run_dir} (run.json: finished at step 20)" in shown
    assert f"best            {best}" in shown and f"final           {final}" in shown
    assert f"best in mlflow  {root}/checkpoints/best-step-10" in shown
    assert f"loss curve      {root}/loss_curve.png" in shown
    assert f"models:/{MODEL}/1 (aliases: best)  val perplexity 30.12" in shown
    assert "device      cpu" in shown

    weights = (best / WEIGHTS).read_bytes()
    for ref in (tracker.run_id[:8], f"models:/{MODEL}@best", f"models:/{MODEL}/1"):
        local = download_checkpoint(uri, ref, tmp_path / "dl" / ref.replace("/", "_"))
        assert (local / WEIGHTS).read_bytes() == weights, ref
        assert (local / "config.yaml").is_file() and not (local / "trainer.pt").exists()

    for ref, message in (
        ("f" * 12, "no MLflow run"),
        (f"models:/{MODEL}@nope", "has no alias 'nope' (aliases: best)"),
        (f"models:/{MODEL}/7", "has no version 7 (versions: 1)"),
        ("models:/nobody@best", "no registered model 'nobody'"),
        ("models:/", "expected models:/NAME@ALIAS"),
    ):
        with pytest.raises(TrackingError, match=message.replace("(", r"\(").replace(")", r"\)")):
            download_checkpoint(uri, ref)
    with pytest.raises(TrackingError, match="no MLflow store"):
        download_checkpoint(f"sqlite:///{tmp_path / 'none.db'}", tracker.run_id)


def test_only_versions_scored_on_the_same_dev_text_compete_for_best(
    make_config, tokenizer_file: Path, tmp_path: Path
) -> None:
    def checkpoint(name: str, dev_bpb: float, *overrides: str) -> Path:
        cfg, _ = make_config(*overrides)
        torch.manual_seed(len(name))
        return save_checkpoint(
            tmp_path / "ckpts" / name, TransformerLM(cfg.model), cfg, tokenizer_file, _metrics(10, dev_bpb)
        )

    cfg, _ = make_config()
    narrow = checkpoint("narrow", 1.0)  # a very good score, but on the default 5% dev slice
    first = _start(make_config, tmp_path / "a")
    with first.track():
        first.finish(cfg, narrow, narrow, trained_steps=10)
    wide = checkpoint("wide", 2.0, "data.dev_fraction=0.1")  # other dev text: 1.0 and 2.0 do not compare
    second = _start(make_config, tmp_path / "b")
    with second.track():
        second.finish(cfg, wide, wide, trained_steps=10)
    assert second.alias_note.startswith(
        "alias best -> version 2 (dev bits/byte 2.0000; version 1 was scored on"
    )
    worse = checkpoint("worse", 2.5, "data.dev_fraction=0.1")
    third = _start(make_config, tmp_path / "c")
    with third.track():
        third.finish(cfg, worse, worse, trained_steps=10)
    assert third.alias_note == "alias best stayed on version 2 (dev bits/byte 2.0000 <= 2.5000 of version 3)"


def test_rank_0s_metrics_reach_the_run_through_the_driver_in_order(
    ray_cluster, make_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pickle

    tracker = _start(make_config, tmp_path / "run")
    inbox = MetricInbox(tracker)
    relay = pickle.loads(pickle.dumps(inbox.relay()))  # as rank 0 gets it: the key prefix and ids, no client
    assert vars(relay)["_sender"] is None and (relay.run_id, relay.uri) == (tracker.run_id, tracker.uri)
    relay.warm_up()
    relay.ready()  # nothing to open or wait for: the worker never imports MLflow
    for step in range(1, 13):
        relay.log(step, {"step": step, "train_loss": 10.0 - step / 2, "lr": float("nan")})
    relay.log(12, {"dev_loss": 4.5})
    relay.close()  # every batch is in the GCS once close returns
    assert inbox.drain() == 13
    assert inbox.drain() == 0  # read once: their keys are gone
    history = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(step, 10.0 - step / 2) for step in range(1, 13)]
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id, "dev_loss")] == [12]
    assert not tracker.client.get_metric_history(tracker.run_id, "lr")  # not finite: not logged, as before
    # a store that fails: the batches wait for the next drain, with one warning
    relay.log(13, {"train_loss": 3.0})
    relay.close()  # in the GCS (a later log starts a new sender)
    working = inbox.client
    inbox.client = mlflow_client(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # has no such run
    with caplog.at_level(logging.WARNING, logger="lmplatform.tracking"):
        assert inbox.drain() == 0
        assert inbox.drain() == 0
    assert caplog.text.count("could not log rank 0's metrics yet") == 1
    inbox.client = working
    assert inbox.drain() == 1
    assert tracker.client.get_metric_history(tracker.run_id, "train_loss")[-1].step == 13
    # at the end: what still cannot be logged is dropped from the GCS with a warning, and close never raises
    relay.log(14, {"train_loss": 2.0})
    relay.close()
    inbox.client = mlflow_client(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmplatform.tracking"):
        inbox.close()
    assert "1 batches of rank 0's metrics could not be logged" in caplog.text
    inbox.client = working
    assert inbox.drain() == 0  # gone from the GCS
    tracker.end("FINISHED")
