"""lm/cli.py end to end on a toy config: data, tokenizer, train, eval, generate, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_train_eval_generate_end_to_end(toy_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = toy_args(train__max_steps=20)
    assert main(["train", "--local", str(REPO / "experiments" / "tiny.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and "bits/byte" in out and "--- sample" in out
    best = tmp_path / "run" / "best"
    assert (best / "model.safetensors").is_file()

    assert main(["eval", str(best), "--json", str(tmp_path / "eval.json")]) == 0
    report = capsys.readouterr().out
    assert "ppl" in report and "bits/byte" in report
    scored = json.loads((tmp_path / "eval.json").read_text())[0]
    assert scored["tokens"] > 0 and scored["perplexity"] > 1

    assert main(["generate", str(best), "--prompt", "KING:", "--max-new-tokens", "15", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("KING:") and len(first) > len("KING:\n")
    assert main(["generate", str(best), "--prompt", "KING:", "--max-new-tokens", "15", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible


def test_data_prepare_and_tokenizer_commands(toy_args, tmp_path: Path, capsys, corpus_file: Path) -> None:
    assert main(["data", "prepare", *toy_args()]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus_file), "--vocab-size", "300", "--out", str(tok)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", str(tok), "Hello, world"]) == 0
    pieces = json.loads(capsys.readouterr().out)["pieces"]
    assert "".join(pieces) == "Hello, world"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--local", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["train", "--local", "experiments/tiny.yaml", "model.n_embd=130"], "model.n_embd=130"),
        (["train", "--local", "experiments/tiny.yaml", "optim.lr"], "not of the form"),
        (["eval", "/no/such/checkpoint"], "not a checkpoint directory"),
        (["generate", "/no/such/checkpoint"], "not a checkpoint directory"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lm", *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_sampling_argument_is_a_user_error(toy_args, tmp_path: Path, capsys) -> None:
    assert main(["train", "--local", *[str(REPO / "experiments" / "tiny.yaml")], *toy_args(train__max_steps=6),
                 "--no-sample"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run" / "best"), "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
