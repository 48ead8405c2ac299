"""lmplatform/train.py with lmplatform/tracking.py: Ray Train around lm's loop, tracked in a real MLflow store."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from lmplatform.tracking import BEST_ALIAS, mlflow_client, registered_model_name
from lmplatform.train import (
    FAIL_ENV,
    PlatformError,
    StopRequest,
    _StopPoller,
    check_resources,
    run_training,
    start_train_coordinator,
)

from lm.checkpoint import METRICS, TRAINER, RunLockedError, load_model, read_run_record, run_lock
from lm.config import ConfigError
from lm.generate import iter_generate
from lm.train import RunFinishedError, TrainError

pytestmark = pytest.mark.ray


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifact_files(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_local_mode_reports_tracks_and_registers(make_config, tmp_path: Path) -> None:
    cfg, pcfg = make_config("train.log_interval=2")
    outcome = run_training(cfg, pcfg)

    # one checkpoint tree, the loop's, in the run directory: step-*, best/ and run.json; no copy by Ray
    run_dir = Path(pcfg.ray.run_dir)
    assert outcome.step == 20 and outcome.trained_steps == 20 and not outcome.interrupted
    assert {"val_loss", "val_ppl", "val_bpb", "dev_loss"} <= set(outcome.metrics)
    assert (
        outcome.final_checkpoint == run_dir / "step-000020" and (outcome.final_checkpoint / TRAINER).is_file()
    )
    assert outcome.best_checkpoint == run_dir / "best"
    load_model(run_dir / "best")  # what `lm eval runs/<name>/best` reads
    assert not list(run_dir.glob("checkpoint_*"))
    assert read_run_record(run_dir)["status"] == "finished"
    assert outcome.time_to_first_step is not None and outcome.time_to_first_step > 0
    assert outcome.device == "cpu"

    client = mlflow_client(pcfg.tracking.uri)
    run = client.get_run(outcome.tracker.run_id)
    assert run.info.status == "FINISHED"
    assert read_run_record(run_dir)["mlflow_run_id"] == run.info.run_id
    params = run.data.params
    assert params["model.n_embd"] == "32"
    assert params["train.max_steps"] == "20"
    assert params["ray.num_workers"] == "0"
    assert params["train.out_dir"] == str(run_dir)  # the directory the loop wrote, absolute
    assert run.data.tags["version.torch"] == torch.__version__
    assert run.data.tags["lmlab.num_workers"] == "0"
    assert run.data.tags["lmlab.device"] == "cpu"
    assert _steps(client, run.info.run_id, "train_loss") == list(range(2, 21, 2))
    assert len(_steps(client, run.info.run_id, "lr")) == 10
    assert run.data.metrics["val_ppl"] == pytest.approx(outcome.metrics["val_ppl"])
    assert "val_bpb" in run.data.metrics and "tokens_per_s" in run.data.metrics

    files = _artifact_files(client, run.info.run_id)
    assert {"config.yaml", "tokenizer.json", "loss_curve.png", "samples.txt"} <= set(files)
    assert "checkpoints/final/model.safetensors" in files
    assert any(f.startswith("checkpoints/best") and f.endswith("model.safetensors") for f in files)
    assert not [f for f in files if f.endswith(TRAINER)], "optimizer state must never reach MLflow"

    # the logged weights are a complete, loadable model
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/final", str(tmp_path / "dl")))
    model, loaded_cfg, tokenizer = load_model(local)
    assert loaded_cfg.model == cfg.model
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    tokens = list(iter_generate(model, idx, 5, temperature=0.0))
    assert len(tokens) == 5

    # registry: a version pointing at this run, and the alias on it
    name = registered_model_name("itest")
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert client.get_model_version_by_alias(name, BEST_ALIAS).version == versions[0].version


def test_restart_leaves_nothing_of_the_previous_run(make_config) -> None:
    cfg, pcfg = make_config()
    first = run_training(cfg, pcfg)
    run_dir = Path(pcfg.ray.run_dir)
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # what older versions let Ray copy here
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")

    cfg2, pcfg2 = make_config("train.max_steps=6", "train.checkpoint_interval=3")
    fresh = run_training(cfg2, pcfg2, restart=True)
    assert fresh.step == 6 and fresh.resumed_from_step is None
    names = {p.name for p in run_dir.iterdir()}
    assert names == {".lock", "run.json", "best", "step-000003", "step-000006"}
    assert json.loads((run_dir / "best" / METRICS).read_text())["step"] <= 6  # not the old 20-step model
    record = read_run_record(run_dir)
    assert record["step"] == 6 and record["mlflow_run_id"] == fresh.tracker.run_id != first.tracker.run_id


def test_a_second_writer_is_refused_at_once_and_writes_nothing(make_config) -> None:
    cfg, pcfg = make_config()
    with run_lock(pcfg.ray.run_dir):  # another `lm train` on this run
        with pytest.raises(RunLockedError, match="in use by another `lm train`"):
            run_training(cfg, pcfg)
    client = mlflow_client(pcfg.tracking.uri)
    experiment = client.get_experiment_by_name("itest")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_finished_run_is_refused_before_any_mlflow_write(make_config) -> None:
    cfg, pcfg = make_config()
    first = run_training(cfg, pcfg)
    client = mlflow_client(pcfg.tracking.uri)
    before = client.get_run(first.tracker.run_id)
    with pytest.raises(RunFinishedError, match="finished at step 20"):
        run_training(cfg, pcfg)
    # an override that cannot resume this run (another model shape) is refused just as early
    cfg2, pcfg2 = make_config("model.n_embd=64")
    with pytest.raises(TrainError):
        run_training(cfg2, pcfg2)
    (run,) = client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    assert run.info.run_id == first.tracker.run_id and run.info.status == "FINISHED"
    assert run.info.end_time == before.info.end_time and run.data.tags == before.data.tags
    assert len(client.search_model_versions(f"name = '{registered_model_name('itest')}'")) == 1


def test_device_maps_onto_ray_resources(make_config) -> None:
    _, pcfg = make_config("train.device=cuda")
    assert pcfg.ray.use_gpu  # Ray gives each worker a GPU; never cuda in MLflow with a CPU worker
    with pytest.raises(ConfigError, match="train.device='cuda:1' is not allowed under Ray"):
        make_config("train.device=cuda:1")
    with pytest.raises(ConfigError, match="contradicts ray.use_gpu=true"):
        make_config("train.device=cpu", "ray.use_gpu=true")
    with pytest.raises(ConfigError, match="ray.run_name"):
        make_config("ray.run_name=..")


def test_a_retry_after_a_launch_that_never_checkpointed_is_a_new_mlflow_run(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        FAIL_ENV, "3"
    )  # fails before its first checkpoint (step 10), like a refused device would
    cfg, pcfg = make_config("optim.lr=1e-3")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_training(cfg, pcfg)
    monkeypatch.delenv(FAIL_ENV)
    cfg, pcfg = make_config("optim.lr=2e-3")
    outcome = run_training(cfg, pcfg)
    client = mlflow_client(pcfg.tracking.uri)
    runs = {
        r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    }
    assert len(runs) == 2 and runs[outcome.tracker.run_id].info.status == "FINISHED"
    assert (
        runs[outcome.tracker.run_id].data.params["optim.lr"] == "0.002"
    )  # the settings it really trained with
    (failed,) = [r for r in runs.values() if r.info.run_id != outcome.tracker.run_id]
    assert failed.info.status == "FAILED" and failed.data.params["optim.lr"] == "0.001"


def test_samples_and_loss_curve_are_readable(make_config, tmp_path: Path) -> None:
    cfg, pcfg = make_config("train.max_steps=6", "train.eval_interval=3", "train.checkpoint_interval=0")
    outcome = run_training(cfg, pcfg)
    client = mlflow_client(pcfg.tracking.uri)
    run_id = outcome.tracker.run_id
    samples = Path(client.download_artifacts(run_id, "samples.txt", str(tmp_path))).read_text()
    assert "--- sample 1 ---\nROMEO:" in samples
    png = Path(client.download_artifacts(run_id, "loss_curve.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_ends_failed(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAIL_ENV, "3")
    cfg, pcfg = make_config()
    client = mlflow_client(pcfg.tracking.uri)
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_training(cfg, pcfg)
    (run,) = client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    assert run.info.status == "FAILED"
    assert "injected failure at step 3" in run.data.tags["lmlab.failure"]
    assert _steps(client, run.info.run_id, "train_loss") == [1, 2]  # logged live, before the failure


def test_rerun_continues_a_stopped_local_mode_run(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAIL_ENV, "13")
    cfg, pcfg = make_config()
    with pytest.raises(RuntimeError):
        run_training(cfg, pcfg)
    monkeypatch.delenv(FAIL_ENV)
    outcome = run_training(cfg, pcfg)  # the same command again
    assert outcome.resumed_from_step == 10
    assert outcome.step == 20
    client = mlflow_client(pcfg.tracking.uri)
    assert client.get_run(outcome.tracker.run_id).info.status == "FINISHED"
    assert outcome.tracker.resumed  # the same MLflow run, reopened
    assert Counter(_steps(client, outcome.tracker.run_id, "train_loss"))[11] == 2  # 11-12 trained again

    fresh = run_training(cfg, pcfg, restart=True)  # lm train --restart: a new run from step 0
    assert fresh.resumed_from_step is None and fresh.step == 20
    assert fresh.tracker.run_id != outcome.tracker.run_id


def test_the_coordinator_the_driver_starts_early_is_the_one_train_uses(ray_cluster, make_config) -> None:
    import ray

    # False would mean this Ray moved the module: make train's first step comes ~1.3 s later again.
    assert start_train_coordinator()
    early = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    cfg, pcfg = make_config("ray.num_workers=1", "train.max_steps=3", "train.eval_interval=0",
                            "train.checkpoint_interval=0")  # fmt: skip
    assert run_training(cfg, pcfg).step == 3
    used = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    assert used._actor_id == early._actor_id  # found by name, not created a second time


def test_only_a_run_on_the_ray_it_started_drops_trains_placement_group_cleaner_and_only_once(
    ray_cluster, make_config
) -> None:
    from lmplatform import lean
    from lmplatform.train import ensure_ray

    # a Ray this process joined (the session's, as a sweep's trials or a cluster's driver do): no claim
    _, pcfg = make_config("ray.num_workers=1")
    lean.claim_cluster(True)  # left over from an earlier run: ensure_ray replaces it
    ensure_ray(pcfg.ray, prestart=True)
    assert lean.take_own_cluster() is False
    lean.claim_cluster(True)  # what ensure_ray records on a Ray it started for the run
    assert lean.take_own_cluster() is True
    assert lean.take_own_cluster() is False  # a second run on that Ray keeps the cleaner


def test_the_stop_flag_reaches_a_worker_through_the_gcs_and_is_deleted_with_the_run(
    ray_cluster, make_config
) -> None:
    import ray
    from ray.experimental import internal_kv

    stop = StopRequest()
    key = stop.worker_handle()

    @ray.remote(num_cpus=0)
    def poll(key: str, seconds: float) -> list[bool]:  # what rank 0 sees, in another process
        poller, seen, end = _StopPoller(key), [], time.monotonic() + seconds
        while time.monotonic() < end:
            seen.append(poller())
            time.sleep(0.05)
        poller.close()
        return seen

    assert not any(ray.get(poll.remote(key, 0.6)))  # nothing asked yet: the flag reads unset
    polling = poll.remote(key, 3.0)
    time.sleep(1.0)
    stop.request("SIGINT")
    seen = ray.get(polling)
    assert seen[-1] and seen[0] is False  # set while it polled, and it saw it
    assert all(seen[seen.index(True) :])  # once seen, it stays seen
    stop.release()
    assert internal_kv._internal_kv_get(key, namespace="lmlab-stop") is None

    cfg, pcfg = make_config("ray.num_workers=1", "train.max_steps=3", "train.eval_interval=0",
                            "train.checkpoint_interval=0")  # fmt: skip
    assert run_training(cfg, pcfg).step == 3
    assert internal_kv._internal_kv_list("", namespace="lmlab-stop") == []  # a run leaves no flag behind


def test_two_cpu_workers_train_together(ray_cluster, make_config) -> None:
    cfg, pcfg = make_config("ray.num_workers=2", "train.max_steps=8", "train.eval_interval=0",
                            "train.checkpoint_interval=0")  # fmt: skip
    outcome = run_training(cfg, pcfg)
    assert outcome.step == 8
    assert outcome.metrics["tokens"] == 8 * cfg.tokens_per_step * 2  # both ranks' batches count
    assert outcome.result.path == pcfg.ray.run_dir
    client = mlflow_client(pcfg.tracking.uri)
    run = client.get_run(outcome.tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmlab.num_workers"] == "2"
    assert _steps(client, run.info.run_id, "train_loss") == list(range(1, 9))  # rank 0 only, once per step


def test_worker_failure_restarts_from_checkpoint_and_rerun_continues(
    ray_cluster, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAIL_ENV, "7")
    cfg, pcfg = make_config("ray.num_workers=1", "ray.max_failures=1", "train.max_steps=12",
                            "train.checkpoint_interval=4", "train.eval_interval=0")  # fmt: skip
    outcome = run_training(cfg, pcfg)
    assert outcome.step == 12
    assert outcome.resumed_from_step == 4  # the restarted group resumed from Ray's checkpoint, not step 0
    client = mlflow_client(pcfg.tracking.uri)
    run_id = outcome.tracker.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = Counter(_steps(client, run_id, "train_loss"))
    # attempt 1 logged 1..6 and failed at 7; attempt 2 resumed at 4: only 5 and 6 ran twice, 1..4 never again
    assert steps == Counter([*range(1, 7), *range(5, 13)])

    # re-running the command with a bigger budget continues the run from Ray's storage (a new controller)
    cfg2, pcfg2 = make_config("ray.num_workers=1", "train.max_steps=14", "train.checkpoint_interval=4",
                              "train.eval_interval=0")  # fmt: skip
    again = run_training(cfg2, pcfg2)
    assert again.resumed_from_step == 12
    assert again.step == 14
    assert again.tracker.run_id == run_id
    assert Counter(_steps(client, run_id, "train_loss"))[13] == 1


def _ddp_grads_loop(config: dict) -> dict:
    """On each of 2 workers: the same model, this rank's half of a fixed batch, one backward pass."""
    from lmplatform.train import ray_distributed_context

    from lm.config import ModelConfig
    from lm.model import TransformerLM

    dist = ray_distributed_context()
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**config["model"]))
    wrapped = dist.wrap_model(model)
    x, y = config["x"], config["y"]
    b = x.shape[0] // dist.world_size
    _, loss = wrapped(x[dist.rank * b : (dist.rank + 1) * b], y[dist.rank * b : (dist.rank + 1) * b])
    loss.backward()
    (agreed,) = dist.all_max([float(dist.rank + 41)])  # the largest rank's value everywhere
    return {
        "world_size": dist.world_size,
        "agreed": agreed,
        # Ray refuses tensors in return values; numpy arrays travel fine
        "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None},
    }


def test_ddp_two_workers_match_one_process_with_twice_the_batch(ray_cluster, tmp_path: Path) -> None:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from lm.config import ModelConfig
    from lm.model import TransformerLM

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    model_cfg = {"vocab_size": 300, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (8, 16), generator=g)
    y = torch.randint(0, 300, (8, 16), generator=g)
    trainer = TorchTrainer(
        _ddp_grads_loop,
        train_loop_config={"model": model_cfg, "x": x, "y": y},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path)),
    )
    out = trainer.fit().return_value
    assert out["world_size"] == 2
    assert out["agreed"] == 42.0

    torch.manual_seed(0)
    reference = TransformerLM(ModelConfig(**model_cfg))
    _, loss = reference(x, y)
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(out["grads"]) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(
            torch.from_numpy(out["grads"][name].copy()), grad, rtol=1e-4, atol=1e-6, msg=name
        )


def test_a_worker_group_the_cluster_cannot_hold_fails_fast(
    make_config, caplog: pytest.LogCaptureFixture
) -> None:
    _, pcfg = make_config("ray.num_workers=3", "ray.cpus_per_worker=1")
    with pytest.raises(
        PlatformError, match=r"ray.num_workers=3 needs 3 CPU .* but the Ray cluster has 2 CPU"
    ):
        check_resources(pcfg.ray, {"CPU": 2.0}, fixed=True)
    with caplog.at_level(
        logging.WARNING, logger="lmplatform.train"
    ):  # Ray's driver logging raises root's level
        check_resources(pcfg.ray, {"CPU": 2.0}, fixed=False)  # a cluster we joined may autoscale: warn, wait
    assert "will wait until the cluster grows" in caplog.text
    check_resources(pcfg.ray, {"CPU": 3.0}, fixed=True)


def test_remote_storage_reports_to_ray_and_restart_starts_fresh(
    ray_cluster, make_config, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    cfg, pcfg = make_config("ray.num_workers=1", f"ray.storage_path={remote.as_uri()}", "train.max_steps=8",
                            "train.checkpoint_interval=4", "train.eval_interval=4")  # fmt: skip
    assert not pcfg.ray.is_local_storage  # file:// goes through pyarrow like s3:// would
    first = run_training(cfg, pcfg)
    assert first.step == 8
    old = {p.name for p in (remote / "itest").glob("checkpoint_*") if p.is_dir()}
    assert old and first.best_checkpoint is not None and first.best_checkpoint.name in old
    assert json.loads((first.final_checkpoint / METRICS).read_text())["step"] == 8

    with pytest.raises(
        RunFinishedError, match="finished at step 8"
    ):  # refused before MLflow, like local runs
        run_training(cfg, pcfg)
    client = mlflow_client(pcfg.tracking.uri)
    assert client.get_run(first.tracker.run_id).info.status == "FINISHED"

    fresh = run_training(cfg, pcfg, restart=True)  # never a silent resume of the old run
    assert fresh.step == 8 and fresh.resumed_from_step is None and fresh.trained_steps == 8
    new = {p.name for p in (remote / "itest").glob("checkpoint_*") if p.is_dir()}
    assert new and not new & old


def test_fsdp_two_workers_report_shards_that_ray_merges_export_weights_and_reshard_onto_one(
    ray_cluster, make_config, tmp_path: Path
) -> None:
    from lm.sharding import SHARDS

    remote = tmp_path / "remote"  # remote storage: every rank reports its own directory and Ray merges them
    cfg, pcfg = make_config("ray.num_workers=2", "ray.strategy=fsdp", f"ray.storage_path={remote.as_uri()}",
                            "train.max_steps=6", "train.checkpoint_interval=3", "train.eval_interval=3")  # fmt: skip
    first = run_training(cfg, pcfg)
    assert first.step == 6 and first.metrics["tokens"] == 6 * cfg.tokens_per_step * 2
    final = first.final_checkpoint
    assert final is not None and final.parent == remote / "itest"
    shards = {p.name for p in (final / SHARDS).iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"} <= shards
    model, _, _ = load_model(final)  # the gathered export, read by lm eval / generate / serve
    assert model.lm_head.weight is model.tok_emb.weight

    client = mlflow_client(pcfg.tracking.uri)
    run = client.get_run(first.tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.strategy"] == "fsdp"
    files = _artifact_files(client, run.info.run_id)
    assert "checkpoints/final/model.safetensors" in files
    assert not [f for f in files if SHARDS in f or f.endswith(TRAINER)], "only weights reach MLflow"
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/final", str(tmp_path / "dl")))
    exported, _, _ = load_model(local)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name

    # the same command on one worker with a longer budget: Ray's merged checkpoint, resharded from 2 ranks onto 1
    cfg1, pcfg1 = make_config("ray.num_workers=1", "ray.strategy=fsdp", f"ray.storage_path={remote.as_uri()}",
                              "train.max_steps=8", "train.checkpoint_interval=3", "train.eval_interval=3")  # fmt: skip
    again = run_training(cfg1, pcfg1)
    assert again.resumed_from_step == 6 and again.step == 8 and again.trained_steps == 2
    assert again.tracker.run_id == first.tracker.run_id
