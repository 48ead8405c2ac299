"""lm/cli.py end to end on a toy config: data, tokenizer, train, eval, generate, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.yaml")


def test_train_eval_generate_end_to_end(
    toy_args, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = toy_args(train__max_steps=20)
    assert main(["train", "--local", str(REPO / "experiments" / "tiny.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and "bits/byte" in out and "--- sample" in out
    run = tmp_path / "run"
    best = run / "best"
    assert (best / "model.safetensors").is_file()
    step = int(json.loads((best / "metrics.json").read_text())["step"])

    # A run directory means its best checkpoint, and says so; the token cache goes to ./data of this machine,
    # not to the cache_dir saved in the checkpoint's config.
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["eval", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    assert "ppl" in captured.out and "bits/byte" in captured.out
    assert f"{run}: using its best checkpoint {best} (step {step})" in captured.err
    assert (here / "data").is_dir()
    scored = json.loads((tmp_path / "eval.json").read_text())[0]
    assert scored["tokens"] > 0 and scored["perplexity"] > 1
    assert scored["model"] == str(run)

    assert main(["generate", str(best), "--prompt", "KING:", "--max-new-tokens", "15", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("KING:") and len(first) > len("KING:\n")
    assert main(["generate", str(run), "--prompt", "KING:", "--max-new-tokens", "15", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible; the run dir is its best


def test_eval_corpus_and_cache_dir_override_the_checkpoints(
    toy_args, tmp_path: Path, capsys: pytest.CaptureFixture[str], corpus_file: Path
) -> None:
    assert main(["train", "--local", TINY, *toy_args(train__max_steps=6), "--no-sample"]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text()[:20_000])
    cache = tmp_path / "my-cache"
    argv = ["eval", str(tmp_path / "run" / "best"), "--corpus", str(other), "--cache-dir", str(cache)]
    assert main([*argv, "--split", "nope"]) == 2
    assert "--split 'nope'" in capsys.readouterr().err  # the error lists the splits the corpus has
    assert main([*argv, "--json", str(tmp_path / "e.json")]) == 0
    assert any(cache.iterdir())
    (scored,) = json.loads((tmp_path / "e.json").read_text())
    assert scored["bytes"] < 20_000 * 0.2  # the val split of the 20 KB file, not of the 40 KB one


def test_eval_baseline_failure_still_prints_the_models_result(
    toy_args, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["train", "--local", TINY, *toy_args(train__max_steps=6), "--no-sample"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    best = str(tmp_path / "run" / "best")
    argv = ["eval", best, "--cache-dir", str(tmp_path / "data"), "--baseline", "no-such-org/no-such-model"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert best in captured.out and "bits/byte" in captured.out  # computed before the baseline failed
    assert "cannot load baseline 'no-such-org/no-such-model'" in captured.err
    assert "`hf download no-such-org/no-such-model --local-dir no-such-model`" in captured.err
    assert "huggingface-cli" not in captured.err


def test_checkpoint_references_that_are_not_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    run = tmp_path / "runs" / "tiny"
    (run / "logs").mkdir(parents=True)
    (run / "notes.txt").write_text("")
    assert main(["generate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint (it contains logs/, notes.txt)" in err
    assert "best/ or step-NNNNNN/" in err


def test_config_show_prints_every_setting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from lm.config import flatten, load_config, to_dict

    exp = str(REPO / "experiments" / "tiny.yaml")
    assert main(["config", "show", exp, "optim.lr=1e-3", "train.max_steps=700"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = flatten(to_dict(load_config(exp, ["optim.lr=1e-3", "train.max_steps=700"])))
    assert [line.split(":")[0] for line in lines] == list(expected)
    assert "optim.lr: 0.001" in lines and "train.max_steps: 700" in lines and "tokenizer.path: null" in lines
    assert main(["config", "show", exp, "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_train_without_arguments_asks_for_the_config_only() -> None:
    proc = subprocess.run([sys.executable, "-m", "lm", "train"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "the following arguments are required: config\n" in proc.stderr  # overrides are optional
    assert "usage: lm train [options] CONFIG [KEY=VALUE ...]" in proc.stderr


def test_library_modules_do_not_import_the_cli() -> None:
    import ast

    entry_points = {"cli.py", "__main__.py", "eval.py"}
    for path in sorted((REPO / "lm").glob("*.py")):
        if path.name in entry_points:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert "lm.cli" not in names, f"{path.name} imports lm.cli (library -> CLI)"
    code = "import sys, lm.train, lm.generate, lm.evaluate, lm.eval; print('lm.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_m_modules_run_the_cli_in_process(toy_args, tmp_path: Path, capsys) -> None:
    from lm.__main__ import run_module

    assert run_module("train", [TINY, *toy_args(train__max_steps=6), "--no-sample"]) == 0  # lm train --local
    assert "toy: step 6" in capsys.readouterr().out
    run = tmp_path / "run"
    assert run_module("eval", [str(run), "--cache-dir", str(tmp_path / "data")]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert run_module("generate", [str(run), "--max-new-tokens", "3"]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "lm.eval", str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


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
        (["eval", "/no/such/checkpoint"], "/no/such/checkpoint does not exist"),
        (["generate", "/no/such/checkpoint"], "/no/such/checkpoint does not exist"),
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


def test_a_finished_run_is_refused_with_hints_that_work_and_an_interrupted_one_exits_130(
    toy_args, tmp_path: Path, capsys
) -> None:
    tiny = str(REPO / "experiments" / "tiny.yaml")
    args = ["train", "--no-sample", tiny, *toy_args(train__max_steps=8, train__checkpoint_interval=4)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 2  # nothing to train: no old number printed as a new result
    captured = capsys.readouterr()
    assert "val perplexity" not in captured.out
    assert (
        "finished at step 8" in captured.err and "--restart to train it again, or --out DIR" in captured.err
    )
    assert main([*args, "--restart"]) == 0 and "step 8" in capsys.readouterr().out  # hint 1 works
    assert main([*args, "--out", str(tmp_path / "other")]) == 0  # hint 2 works
    assert (tmp_path / "other" / "best").is_dir() and "val perplexity" in first


STOP_CLI = """
import sys, threading, os, signal, time
from lm.train import Hooks
import lm.train as t
real = t.train
def train(cfg, *a, **k):  # send ourselves SIGINT after the 3rd step, the way a user's Ctrl-C arrives
    class Send(Hooks):
        def on_log(self, step, metrics):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
    return real(cfg, *a, hooks=Send(), **k)
import lm.cli
lm.cli.train = train
raise SystemExit(lm.cli.main(sys.argv[1:]))
"""


def test_ctrl_c_during_lm_train_saves_and_exits_130(toy_args) -> None:
    tiny = str(REPO / "experiments" / "tiny.yaml")
    args = ["train", "--no-sample", tiny, *toy_args(train__max_steps=1000, train__log_interval=1)]
    proc = subprocess.run(
        [sys.executable, "-c", STOP_CLI, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert "stopped (signal) at step" in proc.stderr and "Run the same command again to resume" in proc.stderr


def test_precision_option_of_eval_and_generate(
    tmp_path: Path, small_text: str, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lm.checkpoint import save_checkpoint
    from lm.config import ExperimentConfig, ModelConfig
    from lm.model import TransformerLM
    from lm.tokenizer import train_tokenizer

    tok = train_tokenizer([small_text], vocab_size=300)
    cfg = ExperimentConfig(model=ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_embd=32))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, TransformerLM(cfg.model), cfg, tok)
    scored = {}
    for precision in ("fp32", "bf16", "int8"):
        argv = ["eval", str(ckpt), "--corpus", str(corpus_file), "--cache-dir", str(tmp_path / "cache")]
        assert main([*argv, "--precision", precision, "--json", str(tmp_path / "e.json")]) == 0
        (scored[precision],) = json.loads((tmp_path / "e.json").read_text())
        argv = ["generate", str(ckpt), "--precision", precision, "--prompt", "KING:", "--max-new-tokens", "5"]
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("KING:") == 3
    assert scored["bf16"]["model"] == f"{ckpt} (bf16)" and scored["fp32"]["model"] == str(ckpt)
    for precision in ("bf16", "int8"):  # the same tokens scored, nearly the same loss
        assert scored[precision]["tokens"] == scored["fp32"]["tokens"]
        assert scored[precision]["loss"] == pytest.approx(scored["fp32"]["loss"], rel=0.01)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(ckpt), "--precision", "fp16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # argparse quotes the choices on some Python versions
    assert "--precision: invalid choice: 'fp16'" in err and all(p in err for p in ("fp32", "bf16", "int8"))
