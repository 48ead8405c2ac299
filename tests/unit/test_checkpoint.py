"""lm/checkpoint.py: atomic writes, clear errors, compiled/plain interchange, retention."""

from __future__ import annotations

import json
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
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
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
            step, model=model, cfg=cfg, tokenizer=tokenizer, metrics={"val_loss": loss}, trainer_state={}
        )
    assert [p.name for p in manager.step_dirs()] == ["step-000030", "step-000040"]
    assert json.loads((manager.best_path / "metrics.json").read_text())["val_loss"] == 2.0
    assert not (manager.best_path / "trainer.pt").exists()  # best is weights only
    (manager.out_dir / ".tmp-step-000050-1-2").mkdir()  # a save that was killed
    assert manager.latest().name == "step-000040"
    manager.clean_temp()
    assert not list(manager.out_dir.glob(".tmp-*"))
