"""Byte-level BPE tokenizer trained from scratch with HuggingFace ``tokenizers``.

Every Unicode string round-trips exactly (``decode(encode(s)) == s``): there is no normalizer, the pre-tokenizer
is GPT-2's byte-level one without an added prefix space, and the initial alphabet holds all 256 bytes, so no text
is ever out of vocabulary. Two special tokens come first: ``<|endoftext|>`` (id 0, EOS and document separator)
and ``<|pad|>`` (id 1).

Special-token text inside user text is *not* escaped: ``"a<|endoftext|>b"`` encodes to ``[a, EOS, b]``, the same
convention as GPT-2 and ``transformers``, so a corpus can mark document ends with the literal string. Decoding
keeps special tokens, so the round trip still holds. Strings with lone surrogates (``"\\ud800"``) have no UTF-8
form and are rejected by :meth:`Tokenizer.encode` with a :class:`TokenizerError` naming the position.

The saved ``tokenizer.json`` loads in ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"

# Chunk boundaries "X\n|Y" with X and Y printable, non-space ASCII: the byte-level regex never lets a
# pre-token cross them, and no special token contains a newline, so encoding chunks separately gives exactly
# the ids of encoding the whole text (tested), while letting long texts be encoded in parallel.
_SAFE_BOUNDARY = re.compile(r"[!-~]\n(?=[!-~])")


class TokenizerError(ValueError):
    """A tokenizer cannot be trained, loaded or applied to the given input."""


class Tokenizer:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` (EOS) and ``<|pad|>`` special tokens."""

    def __init__(self, hf: HFTokenizer) -> None:
        eos = hf.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerError(f"tokenizer has no {EOS_TOKEN!r} token; lmlab needs it as EOS and separator")
        pad = hf.token_to_id(PAD_TOKEN)
        self._hf = hf
        self._eos_id = eos
        # A foreign tokenizer (GPT-2's) may lack <|pad|>; padding with EOS is its usual convention.
        self._pad_id = pad if pad is not None else eos
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._sha256: str | None = None
        self._chunkable: bool | None = None

    @property
    def hf(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``: end of a sequence and separator between documents."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of ``<|pad|>`` (EOS for a tokenizer without one)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special tokens included."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises TokenizerError for a string that has no UTF-8 form."""
        _check_text(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (the fast path for a corpus)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"text {i}")
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included, so ``decode(encode(s)) == s``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=False)

    def chunk_text(self, text: str, max_chars: int = 1 << 18) -> list[str]:
        """Split ``text`` into pieces of about ``max_chars`` whose encodings concatenate to ``encode(text)``."""
        if not self._splits_at_newlines():
            return [text]
        return _split_at_safe_boundaries(text, max_chars)

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text."""
        return self._hf.to_str(pretty=True)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON (sorted keys, no whitespace): changes exactly when the tokenizer does."""
        if self._sha256 is None:
            canonical = json.dumps(
                json.loads(self._hf.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
            self._sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._sha256

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically to ``path`` (a file, or a folder to put it in); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a folder holding one); raises TokenizerError naming a bad file."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception for malformed JSON
            raise TokenizerError(
                f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {exc}"
            ) from exc
        try:
            return cls(hf)
        except TokenizerError as exc:
            raise TokenizerError(f"tokenizer file {str(path)!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, sha256={self.sha256[:12]})"

    def _splits_at_newlines(self) -> bool:
        # Only our own configuration is known to be chunk-safe; a loaded foreign tokenizer is encoded whole.
        if self._chunkable is None:
            spec: dict[str, Any] = json.loads(self._hf.to_str())
            pre = spec.get("pre_tokenizer") or {}
            self._chunkable = (
                spec.get("normalizer") is None
                and pre.get("type") == "ByteLevel"
                and not pre.get("add_prefix_space")
                and pre.get("use_regex", True)
            )
        return self._chunkable


def train_tokenizer(
    texts_or_files: Iterable[str] | str | Path | list[Path],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer; a ``str`` or ``Path`` (or a list of Paths) names files, else texts.

    Deterministic: the same texts and settings give the same ``tokenizer.json``. ``show_progress`` draws the
    trainer's bar only when stdout and stderr are terminals: elsewhere it would print only blank lines.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small: must be an integer >= {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency!r} must be >= 1")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress and _on_terminal(),
    )
    hf.train_from_iterator(_training_pieces(texts_or_files), trainer=trainer)
    return Tokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer; a missing or corrupt file raises TokenizerError naming it."""
    return Tokenizer.from_file(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _on_terminal() -> bool:
    # The Rust trainer draws its bar on fd 2 and ends each stage with a newline on fd 1, bypassing sys.stdout.
    try:
        return os.isatty(1) and os.isatty(2)
    except OSError:
        return False


def _check_text(text: str, what: str = "text") -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(
            f"{what} has a lone surrogate {text[exc.start]!r} at position {exc.start}, "
            "which has no UTF-8 form; encode only valid Unicode text"
        ) from None


def _split_at_safe_boundaries(text: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        match = _SAFE_BOUNDARY.search(text, start + max_chars)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def _training_pieces(texts_or_files: Iterable[str] | str | Path | list[Path]) -> Iterator[str]:
    if isinstance(texts_or_files, (str, Path)):
        texts_or_files = [Path(texts_or_files)]
    for item in texts_or_files:
        if isinstance(item, Path):
            try:
                text = item.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot read training file {str(item)!r}: {exc}") from exc
        else:
            text = item
        _check_text(text, "training text")
        # Pieces let the trainer count words in parallel; the boundaries leave the word counts unchanged.
        yield from _split_at_safe_boundaries(text, 1 << 18)
