"""Self-describing, atomically written checkpoints.

A checkpoint is a directory::

    model.safetensors   weights only (what evaluation, MLflow and Serve load; the average with optim.ema_decay)
    trainer.pt          optimizer, scaler, step, sampler position, RNG states, and with optim.ema_decay the
                        training weights a resume continues from (loaded with weights_only=True)
    config.yaml         the resolved experiment config
    tokenizer.json      the tokenizer the model was trained with
    metrics.json        step, losses, perplexity, bits per byte at save time
    shards/             sharded (FSDP) runs only: model and optimizer shards and per-rank RNG (lm.sharding)

It is written into a temporary sibling directory and renamed into place, so a kill mid-save never leaves a
half-written checkpoint where a loader would find it. A run directory holds ``step-NNNNNN`` checkpoints, ``best``,
``run.json`` (the run's identity and status, see :func:`update_run_record`) and ``.lock`` (one writer at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
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
RUN_RECORD = "run.json"
LOCK = ".lock"
BEST = "best"
_BEST_BACKUP = ".best-previous"  # the old best while a new one is renamed into place
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


def model_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Weights for safetensors: prefixes stripped, tied tensors stored once (lm_head aliases tok_emb).

    ``state`` is the model's full state dict when it was gathered elsewhere (a sharded model's, see
    :func:`lm.sharding.full_weights`), where the tied tensors arrive as two copies.
    """
    raw = unwrap_model(model)
    state = clean_state_dict(raw.state_dict() if state is None else state)
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if _is_tied(raw, name) or (key in seen and tensor.shape == state[seen[key]].shape):
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
    *,
    weights: dict[str, torch.Tensor] | None = None,
    staging: Path | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename) and return its path.

    ``weights``: the model's full state dict, gathered by the caller (a sharded model); ``staging``: the temp dir
    to complete and rename, already holding files other ranks wrote (a sharded checkpoint's ``shards/``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging or path.parent / f".tmp-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(exist_ok=staging is not None)
    try:
        save_file(model_weights(model, weights), str(tmp / WEIGHTS), metadata={"format": "pt"})
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
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected a directory with {WEIGHTS}, {CONFIG}, {TOKENIZER})"
        )
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing; is {path} a checkpoint directory?")
    try:
        # The saved config is already resolved: following an `extends:` would read another machine's files.
        cfg = load_config(path / CONFIG, follow_extends=False)
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG}: {exc}") from exc
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / WEIGHTS}: corrupt or truncated ({exc})") from exc
    metrics = read_metrics(path)
    return Checkpoint(path, cfg, clean_state_dict(weights), metrics, path / TOKENIZER)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metrics.json ({} when absent); corrupt JSON raises CheckpointError."""
    file = Path(path) / METRICS
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc


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
# A run directory: step-NNNNNN checkpoints (the last N kept), `best`, run.json and a lock.


class RunLockedError(CheckpointError):
    """Another process is writing to this run directory."""


def safe_rmtree(path: str | Path, root: str | Path) -> None:
    """Delete the file or tree ``path`` only if it lies strictly inside ``root`` (symlinks resolved); else raise."""
    path, root = Path(path), Path(root)
    # A link is judged by where it stands (it alone is removed), anything else by where it really is.
    target = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()
    owner = root.resolve()
    if target == owner or owner not in target.parents:
        raise CheckpointError(f"refusing to delete {path}: it is not inside {root}")
    if path.is_symlink() or path.is_file():  # a link goes, never what it points to
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def run_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir/.lock`` (flock) for the block: a second writer fails at once instead of racing this one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"{out_dir} is in use by another `lm train` (pid {owner}); wait for it to finish, stop it, "
                "or train into another run directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race the next locker)


def read_run_record(out_dir: str | Path) -> dict[str, Any]:
    """The run's ``run.json`` (identity, status, start settings), or {} when the directory has none."""
    path = Path(out_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable run record ({exc}); remove it or use --restart") from exc


def update_run_record(out_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run.json`` atomically (temp file, fsync, rename); returns the new record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = read_run_record(out_dir) | fields
    tmp = out_dir / f".tmp-{RUN_RECORD}-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=True, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_dir / RUN_RECORD)
    _fsync_path(out_dir)
    return record


class CheckpointManager:
    """Keeps ``out_dir/step-NNNNNN`` (the last ``keep_last``) and ``out_dir/best`` (lowest ``score_key``).

    Every checkpoint records the ``run_id`` of the run that wrote it, and pruning only ever removes checkpoints of
    the current run, so an older, longer run's ``step-*`` can never push a new run's checkpoints out.
    """

    def __init__(
        self, out_dir: str | Path, keep_last: int = 2, run_id: str | None = None, score_key: str = "dev_loss"
    ) -> None:
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last
        self.run_id = run_id
        self.score_key = score_key

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
        return self.out_dir / BEST

    def best_score(self) -> float | None:
        """``score_key`` of the current best checkpoint, if it belongs to this run."""
        try:
            metrics = read_metrics(self.best_path)
        except CheckpointError:
            return None
        if self.run_id is not None and metrics.get("run_id") != self.run_id:
            return None  # another run's best: never compared with
        return metrics.get(self.score_key)

    def step_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` goes."""
        return self.out_dir / f"step-{step:06d}"

    def staging_path(self, step: int) -> Path:
        """The temp dir every rank of a sharded save writes into before rank 0 renames it to :meth:`step_path`
        (a name all ranks can compute; removed by :meth:`clean_temp` when a kill left it behind)."""
        return self.out_dir / f".tmp-step-{step:06d}-staging"

    def save(self, step: int, **kwargs: Any) -> Path:
        """Save ``step-NNNNNN``, update ``best`` when the score improved, prune old steps; returns the new path."""
        metrics = dict(kwargs.pop("metrics", None) or {})
        if self.run_id is not None:
            metrics["run_id"] = self.run_id
        path = save_checkpoint(self.step_path(step), metrics=metrics, **kwargs)
        score, best = metrics.get(self.score_key), self.best_score()
        if score is not None and (best is None or score <= best):
            # best is weights-only: nobody resumes from it, and optimizer state would triple its size
            self.replace_best(path)
        mine = [p for p in self.step_dirs() if self._is_mine(p)]
        for old in mine[: -self.keep_last]:
            safe_rmtree(old, self.out_dir)
        self.clean_temp()
        return path

    def replace_best(self, checkpoint: Path) -> None:
        """Make ``best`` a weights-only copy of ``checkpoint``; recoverable at every instant (see :meth:`recover`)."""
        tmp = self.out_dir / f".tmp-best-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            for name in (WEIGHTS, CONFIG, TOKENIZER, METRICS):
                shutil.copyfile(checkpoint / name, tmp / name)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        backup = self.out_dir / _BEST_BACKUP
        if self.best_path.exists():
            if backup.exists():  # a backup of an earlier replacement whose new best did land
                safe_rmtree(backup, self.out_dir)
            os.replace(self.best_path, backup)  # a kill from here on: recover() puts it back
        os.replace(tmp, self.best_path)
        _fsync_path(self.out_dir)
        if backup.exists():
            safe_rmtree(backup, self.out_dir)

    def update_best_metrics(self, extra: dict[str, Any]) -> None:
        """Add entries (e.g. the validation score) to ``best/metrics.json``, atomically."""
        file = self.best_path / METRICS
        tmp = self.best_path / f".tmp-{METRICS}"
        tmp.write_text(json.dumps(read_metrics(self.best_path) | extra, indent=2, sort_keys=True))
        os.replace(tmp, file)

    def recover(self) -> None:
        """After a kill: restore a ``best`` that was moved aside but not yet replaced; drop temp dirs."""
        backup = self.out_dir / _BEST_BACKUP
        if backup.is_dir():
            if self.best_path.exists():
                safe_rmtree(backup, self.out_dir)
            else:
                os.replace(backup, self.best_path)
                log.warning("restored %s from a replacement interrupted by a kill", self.best_path)
        self.clean_temp()

    def reset(self) -> None:
        """Remove everything a run wrote here (checkpoints, best, run record, temp dirs); other files stay."""
        if not self.out_dir.is_dir():
            return
        for p in self.out_dir.iterdir():
            if (
                _STEP_DIR.match(p.name)
                or p.name in (BEST, _BEST_BACKUP, RUN_RECORD)
                or p.name.startswith(".tmp-")
            ):
                safe_rmtree(p, self.out_dir)

    def clean_temp(self) -> None:
        """Remove temp dirs left behind by saves that were killed."""
        if self.out_dir.is_dir():
            for p in self.out_dir.glob(".tmp-*"):
                safe_rmtree(p, self.out_dir)

    def _is_mine(self, path: Path) -> bool:
        if self.run_id is None:
            return True
        try:
            return read_metrics(path).get("run_id") == self.run_id
        except CheckpointError:
            return False


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed only afterwards."""
    if dst.exists():
        old = dst.parent / f".tmp-old-{dst.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_path(dst.parent)


def _fsync_dir(path: Path) -> None:
    """fsync every file in ``path`` (and its subdirectories) and the directory itself."""
    for child in path.iterdir():
        if child.is_dir():
            _fsync_dir(child)
            continue
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
