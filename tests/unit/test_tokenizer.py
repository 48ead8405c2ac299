"""Tests for lm/tokenizer.py: exact round trips, special tokens, determinism, files, transformers parity."""

from __future__ import annotations

import os
import pty
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

# Any code point but surrogates (category Cs), which have no UTF-8 form and are tested on their own.
UNICODE_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
SPECIALS_MIXED = st.lists(
    st.one_of(UNICODE_TEXT, st.sampled_from([EOS_TOKEN, PAD_TOKEN, "<|", "|>", "<|endoftext"])), max_size=8
).map("".join)
# Lines of words, spaces and newlines: the shapes chunk_text looks for boundaries in.
LINE_PIECES = [
    "a",
    "bc",
    "Z",
    " ",
    "  ",
    "    ",
    ".",
    "'s",
    "!",
    "\t",
    "\r\n",
    "\n",
    "\n\n",
    " \n",
    "é",
    "世",
    "9",
]
LINED_TEXT = st.lists(st.sampled_from([*LINE_PIECES, EOS_TOKEN]), max_size=80).map("".join)
HYPO = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

EDGE_CASES = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "\r\n",
    "windows\r\nline\r\nends\r\n",
    "old mac\rline",
    "\x00",
    "nul\x00in\x00the middle",
    "\x01\x02\x1b[31m\x7f control chars",
    "\t\x0b\x0c tabs and feeds",
    "emoji 🤖🎭 and a family 👩\u200d👩\u200d👧",
    "中文、日本語、한국어",
    "e\u0301 combining (not NFC-normalised)",
    "\ufeffbyte order mark",
    "\U0010ffff last code point",
    "Ünïcödé   \n\n\n  mixed  ",
    "".join(chr(i) for i in range(256)),
]


@pytest.fixture(scope="module")
def tok(small_text: str) -> Tokenizer:
    return train_tokenizer([small_text], vocab_size=400)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_edge_cases(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@HYPO
@given(text=UNICODE_TEXT)
def test_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@HYPO
@given(text=SPECIALS_MIXED)
def test_round_trip_with_special_token_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_of_training_text_compresses(tok: Tokenizer, small_text: str) -> None:
    ids = tok.encode(small_text)
    assert tok.decode(ids) == small_text
    assert len(ids) < 0.6 * len(small_text.encode("utf-8"))  # merges were learned, not just bytes


@pytest.mark.parametrize(("text", "position"), [("\ud800", 0), ("ab\udfffcd", 2), ("ok 🤖 \udc00", 5)])
def test_lone_surrogate_is_rejected_with_its_position(tok: Tokenizer, text: str, position: int) -> None:
    with pytest.raises(TokenizerError, match=f"surrogate .* at position {position}\\b"):
        tok.encode(text)


def test_encode_batch_matches_encode_and_rejects_surrogates(tok: Tokenizer) -> None:
    texts = ["hello world", "", "ROMEO:\nwhat", EOS_TOKEN + "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    with pytest.raises(TokenizerError, match="text 1 .*position 1"):
        tok.encode_batch(["fine", "x\ud800"])


def test_special_tokens(tok: Tokenizer) -> None:
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.encode(EOS_TOKEN) == [tok.eos_id]
    assert tok.encode(PAD_TOKEN) == [tok.pad_id]
    ids = tok.encode("a" + EOS_TOKEN + "b")
    assert ids == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert tok.decode([tok.eos_id, tok.pad_id]) == EOS_TOKEN + PAD_TOKEN
    # A near miss is plain text, not a special token.
    assert tok.eos_id not in tok.encode("<|endoftext|")


def test_vocab_size_counts_specials_and_bounds_ids(tok: Tokenizer, small_text: str) -> None:
    assert tok.vocab_size == 400 == tok.hf.get_vocab_size(with_added_tokens=True)
    assert max(tok.encode(small_text)) < tok.vocab_size
    with pytest.raises(TokenizerError, match="400"):
        tok.decode([400])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


def test_smallest_vocab_is_bytes_plus_specials() -> None:
    tok = train_tokenizer(["some text that would otherwise be merged merged merged"], vocab_size=258)
    assert tok.vocab_size == 258
    text = "some text 🤖"
    assert len(tok.encode(text)) == len(text.encode("utf-8"))  # one token per byte: no merges fit
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("bad", [257, 0, -5, 2.5, True])
def test_bad_vocab_size(bad: object) -> None:
    with pytest.raises(TokenizerError, match="vocab_size.*258"):
        train_tokenizer(["abc"], vocab_size=bad)  # type: ignore[arg-type]


def test_training_is_deterministic(small_text: str) -> None:
    a = train_tokenizer([small_text], vocab_size=350)
    b = train_tokenizer([small_text], vocab_size=350)
    other = train_tokenizer([small_text[:20_000]], vocab_size=350)
    assert a.to_json() == b.to_json()
    assert a.sha256 == b.sha256
    assert other.sha256 != a.sha256


def test_train_from_files_equals_train_from_texts(tmp_path: Path, small_text: str) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(small_text[:25_000], encoding="utf-8")
    second.write_text(small_text[25_000:], encoding="utf-8")
    from_texts = train_tokenizer([small_text[:25_000], small_text[25_000:]], vocab_size=330)
    assert train_tokenizer([first, second], vocab_size=330).sha256 == from_texts.sha256
    assert (
        train_tokenizer(str(first), vocab_size=330).sha256 == train_tokenizer([first], vocab_size=330).sha256
    )
    with pytest.raises(TokenizerError, match="missing.txt"):
        train_tokenizer(tmp_path / "missing.txt", vocab_size=300)


def test_save_and_load_round_trip(tmp_path: Path, tok: Tokenizer) -> None:
    path = tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(path)
    assert loaded.sha256 == tok.sha256
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert loaded.encode("ROMEO: O 🤖 " + EOS_TOKEN) == tok.encode("ROMEO: O 🤖 " + EOS_TOKEN)
    assert Tokenizer.from_file(tmp_path).sha256 == tok.sha256  # a folder holding tokenizer.json
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_sha256_ignores_formatting_but_not_content(tmp_path: Path, tok: Tokenizer) -> None:
    compact = tmp_path / "compact.json"
    compact.write_text(tok.hf.to_str(pretty=False), encoding="utf-8")
    assert load_tokenizer(compact).sha256 == tok.sha256
    assert train_tokenizer(["completely different text"], vocab_size=400).sha256 != tok.sha256


def test_missing_and_corrupt_files(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="nope.json.*does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match="corrupt.json.*not a valid tokenizer.json"):
        load_tokenizer(corrupt)
    no_eos = tmp_path / "no_eos.json"
    no_eos.write_text(tok.to_json().replace(EOS_TOKEN, "<|other|>"), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"no_eos.json.*<\|endoftext\|>"):
        load_tokenizer(no_eos)


@pytest.mark.parametrize("max_chars", [50, 400, 5000])
def test_chunked_encoding_equals_whole_encoding(tok: Tokenizer, small_text: str, max_chars: int) -> None:
    chunks = tok.chunk_text(small_text, max_chars=max_chars)
    assert len(chunks) > 1
    assert "".join(chunks) == small_text
    assert [i for ids in tok.encode_batch(chunks) for i in ids] == tok.encode(small_text)


@pytest.fixture(scope="module")
def whitespace_tok() -> Tokenizer:
    """Trained on whitespace-heavy text, so it has merges like "  \n" that a careless chunk boundary would split."""
    rng = random.Random(0)
    return train_tokenizer(["".join(rng.choice(LINE_PIECES) for _ in range(20_000))], vocab_size=300)


@HYPO
@given(text=LINED_TEXT, max_chars=st.integers(1, 12))
def test_chunked_encoding_equals_whole_encoding_on_random_lines(
    whitespace_tok: Tokenizer, text: str, max_chars: int
) -> None:
    chunks = whitespace_tok.chunk_text(text, max_chars=max_chars)
    assert "".join(chunks) == text
    assert [i for ids in whitespace_tok.encode_batch(chunks) for i in ids] == whitespace_tok.encode(text)


def test_transformers_fast_tokenizer_encodes_identically(tmp_path: Path, tok: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    path = tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for text in [*EDGE_CASES, "First Citizen:\nBefore we proceed" + EOS_TOKEN + " next doc"]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text


TRAIN_WITH_PROGRESS = """
from lm.tokenizer import train_tokenizer
train_tokenizer(["hello world " * 500 + "abc def\\n" * 50], 300, show_progress=True)
print("done")
"""


def test_training_progress_prints_nothing_when_output_is_not_a_terminal() -> None:
    # Piped output (a log file, CI, Ray): the trainer used to print one blank line per stage.
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_WITH_PROGRESS], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_training_progress_is_drawn_on_a_terminal() -> None:
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_WITH_PROGRESS], stdout=sub, stderr=sub)
    os.close(sub)
    out = b""
    try:
        while True:  # read while it runs: a full pty buffer would block the child
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child exited and its side of the pty is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        returncode = proc.wait(timeout=120)
    assert returncode == 0
    assert b"Compute merges" in out and b"done" in out
