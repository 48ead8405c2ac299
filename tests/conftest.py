"""Shared fixtures. Integration fixtures (one local Ray per session, a temp MLflow store) live in
tests/integration/conftest.py so the unit suite never pays for them."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The bundled tiny-shakespeare corpus (decompressed once per session)."""
    with gzip.open(REPO_ROOT / "lm" / "corpora" / "tinyshakespeare.txt.gz", "rt", encoding="utf-8") as fh:
        return fh.read()


@pytest.fixture(scope="session")
def small_text(shakespeare_text: str) -> str:
    """About 40 KB of Shakespeare: enough to train a tokenizer and a toy model in seconds."""
    return shakespeare_text[:40_000]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    """A small local text corpus on disk."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-40k.txt"
    path.write_text(small_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache per test session, so the tokenizer is trained once."""
    return tmp_path_factory.mktemp("data-cache")


def toy_overrides(corpus: Path, cache: Path, out_dir: Path, **extra: object) -> list[str]:
    """Dotted overrides for a model and run small enough to train in a second or two."""
    base = {
        "name": "toy",
        "data.corpus": str(corpus),
        "data.cache_dir": str(cache),
        "model.vocab_size": 320,
        "model.block_size": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
        "train.batch_size": 8,
        "train.max_steps": 30,
        "train.max_seconds": None,
        "train.log_interval": 5,
        "train.eval_interval": 0,
        "train.eval_max_batches": 4,
        "train.checkpoint_interval": 0,
        "train.num_threads": 1,
        "train.device": "cpu",
        "train.amp": "off",  # fp32 on every machine (auto picks bf16 on CPUs that have it)
        "train.out_dir": str(out_dir),
        "sample.max_new_tokens": 20,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture
def toy_cfg(corpus_file: Path, data_cache: Path, tmp_path: Path):
    """Build a toy ExperimentConfig; keyword overrides use '__' for dots (train__max_steps=10)."""
    from lm.config import load_config

    def make(**extra: object):
        return load_config(None, toy_overrides(corpus_file, data_cache, tmp_path / "run", **extra))

    return make


@pytest.fixture
def toy_args(corpus_file: Path, data_cache: Path, tmp_path: Path):
    """The toy config as CLI override strings (same keyword convention as ``toy_cfg``)."""

    def make(**extra: object) -> list[str]:
        return toy_overrides(corpus_file, data_cache, tmp_path / "run", **extra)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of toy-shape tests: fastest there, and the VM is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
