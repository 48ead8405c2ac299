"""Self-describing, atomically written checkpoints.

A checkpoint is a directory::

    model.safetensors   weights only (what evaluation, MLflow and Serve load)
    trainer.pt          optimizer, scaler, step, sampler position, RNG states (loaded with weights_only=True)
    config.yaml         the resolved experiment config
    tokenizer.json      the tokenizer the model was trained with
    metrics.json        step, losses, perplexity, bits per byte at save time

It is written into a temporary sibling directory and renamed into place, so a kill mid-save never leaves a
half-written checkpoint where a loader would find it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm.config import ConfigError, ExperimentConfig, load_config, save_config
from lm.model import TransformerLM
from lm.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger("lm.checkpoint")

WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Prefixes that torch.compile and DDP add to parameter names; stripped so checkpoints interchange.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not match the model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint directory."""

    path: Path
    config: ExperimentConfig
    weights: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    tokenizer_path: Path

    def trainer_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The optimizer/RNG/sampler state, or None for a weights-only checkpoint."""
        path = self.path / TRAINER
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises many types for truncated or foreign pickles
            raise CheckpointError(f"{path}: cannot read trainer state ({type(exc).__name__}: {exc})") from exc


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile / DDP name prefixes and tied duplicates' aliasing, keeping plain tensors."""
    out = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights for safetensors: prefixes stripped, tied tensors stored once (lm_head aliases tok_emb)."""
    raw = unwrap_model(model)
    state = clean_state_dict(raw.state_dict())
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key in seen and tensor.shape == state[seen[key]].shape:
            continue  # safetensors refuses shared storage; the tie is restored on load
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    tokenizer: Tokenizer | str | Path,
    metrics: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file(model_weights(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_config(cfg, tmp / CONFIG)
        if isinstance(tokenizer, Tokenizer):
            tokenizer.save(tmp / TOKENIZER)
        else:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        (tmp / METRICS).write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory; any missing or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected {WEIGHTS}, {CONFIG}, {TOKENIZER})"
        )
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing; is {path} a checkpoint directory?")
    try:
        cfg = load_config(path / CONFIG)
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG}: {exc}") from exc
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / WEIGHTS}: corrupt or truncated ({exc})") from exc
    metrics: dict[str, Any] = {}
    if (path / METRICS).is_file():
        try:
            metrics = json.loads((path / METRICS).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / METRICS}: not valid JSON ({exc})") from exc
    return Checkpoint(path, cfg, clean_state_dict(weights), metrics, path / TOKENIZER)


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy weights into ``model`` (plain, compiled or DDP); mismatches raise CheckpointError naming tensors."""
    raw = unwrap_model(model)
    expected = clean_state_dict(raw.state_dict())
    tied = {n for n in expected if n not in weights and _is_tied(raw, n)}
    missing = sorted(set(expected) - set(weights) - tied)
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
    raw.load_state_dict(weights, strict=False)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    return name == "lm_head.weight" and head is not None and emb is not None and head.weight is emb.weight


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[TransformerLM, ExperimentConfig, Tokenizer]:
    """Build the model a checkpoint describes, load its weights and tokenizer; ready for eval or generation."""
    ckpt = load_checkpoint(path)
    model = TransformerLM(ckpt.config.model)
    load_weights_into(model, ckpt.weights, ckpt.path / WEIGHTS)
    try:
        tokenizer = load_tokenizer(ckpt.tokenizer_path)
    except TokenizerError as exc:
        raise CheckpointError(f"{ckpt.tokenizer_path}: {exc}") from exc
    return model.to(device).eval(), ckpt.config, tokenizer


# --------------------------------------------------------------------------------------------------------------
# RNG state that torch.load(weights_only=True) can read back: plain ints, tuples and tensors only.


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------
# A run directory: step-NNNNNN checkpoints (the last N kept) plus `best`.


class CheckpointManager:
    """Keeps ``out_dir/step-NNNNNN`` (the last ``keep_last``) and ``out_dir/best`` (lowest val loss)."""

    def __init__(self, out_dir: str | Path, keep_last: int = 2) -> None:
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last

    def step_dirs(self) -> list[Path]:
        """Complete step checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
        if not self.out_dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.out_dir.iterdir()
            if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest step checkpoint, or None."""
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    @property
    def best_path(self) -> Path:
        """Where the best checkpoint lives."""
        return self.out_dir / "best"

    def best_val_loss(self) -> float | None:
        """Validation loss of the current best checkpoint, if any."""
        metrics = self.best_path / METRICS
        if not metrics.is_file():
            return None
        try:
            return json.loads(metrics.read_text()).get("val_loss")
        except json.JSONDecodeError:
            return None

    def save(self, step: int, **kwargs: Any) -> Path:
        """Save ``step-NNNNNN``, update ``best`` when val_loss improved, prune old steps; returns the new path."""
        path = save_checkpoint(self.out_dir / f"step-{step:06d}", **kwargs)
        val_loss = (kwargs.get("metrics") or {}).get("val_loss")
        best = self.best_val_loss()
        if val_loss is not None and (best is None or val_loss <= best):
            # best is weights-only: nobody resumes from it, and optimizer state would triple its size
            save_checkpoint(self.best_path, **{**kwargs, "trainer_state": None})
        for old in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.clean_temp()
        return path

    def clean_temp(self) -> None:
        """Remove temp dirs left behind by saves that were killed."""
        if self.out_dir.is_dir():
            for p in self.out_dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed only afterwards."""
    if dst.exists():
        old = dst.parent / f".tmp-old-{dst.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
