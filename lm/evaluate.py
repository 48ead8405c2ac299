"""Evaluation: perplexity and bits per byte over a whole held-out split, and a GPT-2 baseline on the same text.

Perplexity = exp(mean NLL per predicted token). Bits per byte = total NLL / (ln 2 x UTF-8 bytes of the text):
unlike perplexity it does not depend on the tokenizer, so it compares our 2048-token BPE with GPT-2's 50257.
Windows are non-overlapping, so every token is scored exactly once, with the context of its own window.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from lm.data import iter_eval_batches


class EvalError(RuntimeError):
    """Evaluation cannot run: a baseline model cannot be loaded, or the text is empty."""


@dataclass
class EvalResult:
    """Scores of one model on one text."""

    model: str
    text: str
    nll_sum: float  # nats, summed over predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text
    window: int  # tokens per scoring window

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token, in nats."""
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per token): only comparable between models sharing a tokenizer."""
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits over the text's UTF-8 bytes: comparable across tokenizers."""
        return bits_per_byte(self.nll_sum, self.bytes)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict including the derived numbers (for JSON and MLflow)."""
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL (nats) -> bits per UTF-8 byte."""
    return nll_sum / (math.log(2) * n_bytes) if n_bytes else float("nan")


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens over ``tokens`` in non-overlapping windows.

    Always fp32, even inside an autocast region, so a training run, ``lm eval`` and MLflow agree on a checkpoint.
    """
    was_training = model.training
    model.eval()
    nll = 0.0
    count = 0
    try:
        for x, y in iter_eval_batches(tokens, block_size, batch_size, max_batches=max_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(torch.device(device).type, enabled=False):
                logits, _ = model(x)
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    return nll, count


def evaluate_split(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_bytes: int,
    block_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    model_name: str = "model",
    text_name: str = "val",
) -> EvalResult:
    """Score a tokenized split; with ``max_batches`` only a prefix, its byte count scaled to the tokens scored."""
    nll, count = score_tokens(model, tokens, block_size, batch_size, device, max_batches)
    if count == 0:
        raise EvalError(f"the {text_name} split has no tokens to score")
    total_targets = max(len(tokens) - 1, 1)
    scored_bytes = n_bytes if count >= total_targets else round(n_bytes * count / total_targets)
    return EvalResult(model_name, text_name, nll, count, scored_bytes, block_size)


# --------------------------------------------------------------------------------------------------------------
# Baseline: any Hugging Face causal LM (GPT-2 by name when the hub is reachable, or a local directory)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub ($HF_ENDPOINT) opens within ``timeout`` seconds.

    Behind an HTTPS proxy, or with HF_HUB_OFFLINE set, the hub client decides itself (True).
    """
    deferred = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE")
    if any(os.environ.get(k) for k in deferred):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf_causal_lm(name_or_path: str, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load a ``transformers`` causal LM and its tokenizer; a clear EvalError when it cannot be had."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise EvalError("the GPT-2 baseline needs the 'transformers' package") from exc
    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    # Without a network, the hub client retries for most of a minute before giving up; a one-second probe
    # turns that into "use the local cache or fail now".
    cache_only = {} if local.exists() or hub_reachable() else {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **cache_only)
        model = AutoModelForCausalLM.from_pretrained(source, **cache_only)
    except (OSError, ValueError) as exc:
        hint = (
            "the Hugging Face hub is not reachable from here (or the name is wrong); download it on a machine "
            f"with access (`hf download {name_or_path} --local-dir {Path(name_or_path).name}`, hf being "
            "huggingface_hub's command) and pass that directory"
            if not local.exists()
            else "that directory does not hold a transformers causal LM with its tokenizer"
        )
        raise EvalError(
            f"cannot load baseline {name_or_path!r}: {hint}. ({type(exc).__name__}: {exc})"
        ) from exc
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def evaluate_hf_baseline(
    name_or_path: str,
    text: str,
    text_name: str = "val",
    window: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Score ``text`` with a Hugging Face causal LM in non-overlapping windows (default: its full context)."""
    if not text:
        raise EvalError(f"the {text_name} text is empty")
    model, tokenizer = load_hf_causal_lm(name_or_path, device)
    n_ctx = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 1024
    )
    window = min(window or n_ctx, n_ctx)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    nll, count = score_tokens(_LogitsOnly(model), ids, window, batch_size, device)
    return EvalResult(name_or_path, text_name, nll, count, len(text.encode("utf-8")), window)


class _LogitsOnly(torch.nn.Module):
    """Adapts a transformers model to this module's ``model(x) -> (logits, loss)`` convention."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.hf_model(input_ids=idx).logits, None


def format_report(results: list[EvalResult]) -> str:
    """A small aligned table: model, text, window, tokens, loss, perplexity, bits per byte."""
    rows = [("model", "text", "window", "tokens", "bytes", "loss", "ppl", "bits/byte")]
    for r in results:
        rows.append(
            (r.model, r.text, str(r.window), f"{r.tokens:,}", f"{r.bytes:,}", f"{r.loss:.4f}", f"{r.perplexity:.2f}",
             f"{r.bits_per_byte:.4f}")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    note = "perplexity compares only models sharing a tokenizer; bits per byte compares across tokenizers"
    return "\n".join([*lines, note])
