"""lm/checkpoint.py: atomic writes, clear errors, compiled/plain interchange, retention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lm.checkpoint as ckpt_mod
from lm.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from lm.config import load_config
from lm.model import TransformerLM
from lm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(["hello world, this is a tiny tokenizer corpus. " * 20], vocab_size=300)


@pytest.fixture
def cfg():
    return load_config(
        None, ["model.vocab_size=300", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]
    )


def test_round_trip_restores_weights_config_tokenizer_and_metrics(tmp_path: Path, cfg, tokenizer) -> None:
    model = TransformerLM(cfg.model)
    path = save_checkpoint(
        tmp_path / "ck", model, cfg, tokenizer, metrics={"val_loss": 1.5}, trainer_state={"step": 3}
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml", "metrics.json", "model.safetensors", "tokenizer.json", "trainer.pt",
    ]  # fmt: skip
    loaded, loaded_cfg, loaded_tok = load_model(path)
    assert loaded_cfg == cfg
    assert loaded_tok.encode("hello world") == tokenizer.encode("hello world")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # the tie survives the round trip
    assert load_checkpoint(path).metrics == {"val_loss": 1.5}
    assert load_checkpoint(path).trainer_state() == {"step": 3}


def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, cfg, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TransformerLM(cfg.model)
    path = save_checkpoint(tmp_path / "ck", model, cfg, tokenizer, metrics={"val_loss": 2.0})
    before = load_checkpoint(path).weights

    def dying_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model, cfg, tokenizer, metrics={"val_loss": 1.0}, trainer_state={"step": 9})
    after = load_checkpoint(path)
    assert after.metrics == {"val_loss": 2.0}
    assert torch.equal(after.weights["tok_emb.weight"], before["tok_emb.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directory left behind


def test_compiled_and_plain_checkpoints_interchange(tmp_path: Path, cfg, tokenizer) -> None:
    plain = TransformerLM(cfg.model)
    compiled = torch.compile(TransformerLM(cfg.model))
    path = save_checkpoint(tmp_path / "from-compiled", compiled, cfg, tokenizer)
    keys = load_checkpoint(path).weights.keys()
    assert not any(k.startswith("_orig_mod.") for k in keys)
    ckpt_mod.load_weights_into(plain, load_checkpoint(path).weights, path)
    ckpt_mod.load_weights_into(compiled, load_checkpoint(path).weights, path)
    prefixed = {f"_orig_mod.{k}": v for k, v in compiled.state_dict().items()}
    ckpt_mod.load_weights_into(plain, ckpt_mod.clean_state_dict(prefixed), "prefixed")
    for a, b in zip(plain.parameters(), compiled.parameters()):
        assert torch.equal(a, b)


def test_errors_name_the_file_and_problem(tmp_path: Path, cfg, tokenizer) -> None:
    with pytest.raises(CheckpointError, match="missing: does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "file")
    path = save_checkpoint(
        tmp_path / "ck", TransformerLM(cfg.model), cfg, tokenizer, trainer_state={"step": 1}
    )
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_checkpoint(path)
    (path / "trainer.pt").write_bytes(b"not a torch file")
    path2 = save_checkpoint(tmp_path / "ck2", TransformerLM(cfg.model), cfg, tokenizer)
    (path2 / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"trainer\.pt: cannot read trainer state"):
        load_checkpoint(path2).trainer_state()
    (path2 / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"config\.yaml: missing"):
        load_checkpoint(path2)


def test_mismatched_shapes_are_rejected_naming_the_tensor(tmp_path: Path, cfg, tokenizer) -> None:
    path = save_checkpoint(tmp_path / "ck", TransformerLM(cfg.model), cfg, tokenizer)
    bigger = load_config(
        None, ["model.vocab_size=300", "model.n_embd=64", "model.n_head=2", "model.block_size=16"]
    )
    with pytest.raises(
        CheckpointError, match=r"tensor '[\w.]+' has shape \([\d, ]+\), the model expects \([\d, ]+\)"
    ):
        ckpt_mod.load_weights_into(TransformerLM(bigger.model), load_checkpoint(path).weights, path)


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_manager_keeps_the_last_n_and_the_best(tmp_path: Path, cfg, tokenizer) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    model = TransformerLM(cfg.model)
    for step, loss in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)]:
        manager.save(
            step, model=model, cfg=cfg, tokenizer=tokenizer, metrics={"dev_loss": loss}, trainer_state={}
        )
    assert [p.name for p in manager.step_dirs()] == ["step-000030", "step-000040"]
    assert json.loads((manager.best_path / "metrics.json").read_text())["dev_loss"] == 2.0
    assert not (manager.best_path / "trainer.pt").exists()  # best is weights only
    (manager.out_dir / ".tmp-step-000050-1-2").mkdir()  # a save that was killed
    assert manager.latest().name == "step-000040"
    manager.clean_temp()
    assert not list(manager.out_dir.glob(".tmp-*"))


def _save_steps(manager: CheckpointManager, cfg, tokenizer, steps_losses) -> None:
    model = TransformerLM(cfg.model)
    for step, loss in steps_losses:
        manager.save(
            step, model=model, cfg=cfg, tokenizer=tokenizer, metrics={"dev_loss": loss}, trainer_state={}
        )


def test_pruning_and_best_never_cross_runs(tmp_path: Path, cfg, tokenizer) -> None:
    old = CheckpointManager(tmp_path / "run", keep_last=2, run_id="old")
    _save_steps(old, cfg, tokenizer, [(1500, 1.0), (1538, 0.9)])  # an older, longer, better run
    new = CheckpointManager(tmp_path / "run", keep_last=2, run_id="new")
    _save_steps(new, cfg, tokenizer, [(500, 3.0), (1000, 2.5), (1355, 2.0)])
    names = [p.name for p in new.step_dirs()]
    # the new run's own last two survive; the old run's are not counted against them (and not compared with)
    assert {"step-001000", "step-001355"} <= set(names) and "step-000500" not in names
    best = json.loads((new.best_path / "metrics.json").read_text())
    assert best["run_id"] == "new" and best["dev_loss"] == 2.0


def test_reset_removes_only_what_a_run_wrote(tmp_path: Path, cfg, tokenizer) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=2, run_id="a")
    _save_steps(manager, cfg, tokenizer, [(10, 2.0)])
    ckpt_mod.update_run_record(manager.out_dir, run_id="a")
    (manager.out_dir / "notes.txt").write_text("mine")
    manager.reset()
    assert sorted(p.name for p in manager.out_dir.iterdir()) == ["notes.txt"]


def test_a_kill_between_the_two_renames_of_best_loses_nothing(
    tmp_path: Path, cfg, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=3, run_id="r")
    _save_steps(manager, cfg, tokenizer, [(10, 2.0)])
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):  # the process "dies" right after the old best was moved aside
        calls.append(Path(dst).name)
        if Path(dst).name == "best" and ".best-previous" in calls:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save_steps(manager, cfg, tokenizer, [(20, 1.0)])
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert not manager.best_path.exists()  # the instant after the kill: best was moved aside...
    CheckpointManager(tmp_path / "run").recover()  # ...and the next start puts it back
    assert json.loads((manager.best_path / "metrics.json").read_text())["dev_loss"] == 2.0
    assert not list(manager.out_dir.glob(".tmp-*")) and not (manager.out_dir / ".best-previous").exists()


def test_safe_rmtree_refuses_anything_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for bad in (root, tmp_path, root / ".." / "precious", root / "a" / ".." / ".."):
        with pytest.raises(CheckpointError, match="refusing to delete"):
            ckpt_mod.safe_rmtree(bad, root)
    ckpt_mod.safe_rmtree(root / "link", root)  # the link goes, never what it points to
    assert outside.is_dir() and not (root / "link").exists()
    ckpt_mod.safe_rmtree(root / "a", root)
    assert not (root / "a").exists() and root.is_dir()


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    with ckpt_mod.run_lock(tmp_path / "run"):
        with pytest.raises(
            ckpt_mod.RunLockedError, match=rf"in use by another `lm train` \(pid {os.getpid()}\)"
        ):
            with ckpt_mod.run_lock(tmp_path / "run"):
                pass
    with ckpt_mod.run_lock(tmp_path / "run"):  # released when the holder is done
        pass


def test_run_record_merges_atomically(tmp_path: Path) -> None:
    assert ckpt_mod.read_run_record(tmp_path / "nothing") == {}
    ckpt_mod.update_run_record(tmp_path, run_id="x", status="running")
    record = ckpt_mod.update_run_record(tmp_path, status="finished", mlflow_run_id="m")
    assert record == {"run_id": "x", "status": "finished", "mlflow_run_id": "m"}
    assert ckpt_mod.read_run_record(tmp_path) == record and not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"run\.json: unreadable run record"):
        ckpt_mod.read_run_record(tmp_path)


def test_a_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_a_saved_config_is_loaded_without_following_extends(tmp_path: Path, cfg, tokenizer) -> None:
    path = save_checkpoint(tmp_path / "ck", TransformerLM(cfg.model), cfg, tokenizer)
    (tmp_path / "elsewhere.yaml").write_text("train:\n  batch_size: 999\n")
    text = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text("extends: ../elsewhere.yaml\n" + text)
    with pytest.raises(CheckpointError, match="extends"):
        load_checkpoint(path)
