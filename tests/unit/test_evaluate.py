"""lm/evaluate.py: perplexity and bits per byte, and the Hugging Face baseline on a locally built GPT-2."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.config import load_config
from lm.evaluate import bits_per_byte, evaluate_hf_baseline, evaluate_split, format_report
from lm.model import TransformerLM
from lm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = load_config(
        None, ["model.vocab_size=300", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]
    )
    return TransformerLM(cfg.model).eval()


def test_split_scores_match_a_window_by_window_computation(model: TransformerLM) -> None:
    tokens = np.random.default_rng(0).integers(0, 300, size=16 * 5 + 7).astype(np.uint16)
    result = evaluate_split(model, tokens, n_bytes=1000, block_size=16, batch_size=2)
    expected, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):
            chunk = torch.tensor(tokens[start : start + 17].astype(np.int64))
            logits, _ = model(chunk[:-1][None])
            expected += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    assert result.tokens == count == len(tokens) - 1
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / count), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / (math.log(2) * 1000), rel=1e-5)


def test_a_prefix_evaluation_scales_the_byte_count(model: TransformerLM) -> None:
    tokens = np.arange(16 * 8 + 1, dtype=np.uint16) % 300
    result = evaluate_split(model, tokens, n_bytes=4000, block_size=16, batch_size=2, max_batches=1)
    assert result.tokens == 32
    assert result.bytes == round(4000 * 32 / 128)


def test_bits_per_byte_unit() -> None:
    assert bits_per_byte(math.log(2) * 80, 10) == pytest.approx(8.0)


def test_hf_baseline_scores_a_locally_built_gpt2(tmp_path: Path, small_text: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = train_tokenizer([small_text], vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=hf_tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    )
    gpt2.save_pretrained(tmp_path / "tiny-gpt2")
    hf_tok.save_pretrained(tmp_path / "tiny-gpt2")
    text = small_text[:3000]
    result = evaluate_hf_baseline(str(tmp_path / "tiny-gpt2"), text, "val", batch_size=4)
    n_tokens = len(tok.encode(text))
    assert result.window == 64
    assert result.tokens == n_tokens - 1
    assert result.bytes == len(text.encode())
    assert abs(result.loss - math.log(hf_tok.vocab_size)) < 0.5  # an untrained model is near uniform
    assert "bits/byte" in format_report([result])


def test_hf_baseline_offline_fails_with_a_clear_message(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the offline run needs a fresh interpreter.
    code = (
        "from lm.evaluate import EvalError, evaluate_hf_baseline\n"
        "import sys\n"
        "for source in ('gpt2', sys.argv[1]):\n"
        "    try:\n"
        "        evaluate_hf_baseline(source, 'some text')\n"
        "    except EvalError as exc:\n"
        "        print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cannot load baseline 'gpt2': the Hugging Face hub is not reachable")
    assert (
        f"cannot load baseline '{tmp_path}': that directory does not hold a transformers causal LM"
        in proc.stdout
    )


def test_an_unreachable_hub_means_cache_only_and_a_clear_error(tmp_path: Path) -> None:
    # Nothing listens on the port just released, so the probe fails at once, as it does with no network.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "from lm.evaluate import EvalError, evaluate_hf_baseline, hub_reachable\n"
        "print(hub_reachable())\n"
        "try:\n"
        "    evaluate_hf_baseline('gpt2', 'some text')\n"
        "except EvalError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    reachable, message = proc.stdout.splitlines()[:2]
    assert reachable == "False"
    assert message.startswith("cannot load baseline 'gpt2': the Hugging Face hub is not reachable"), message
