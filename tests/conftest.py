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
