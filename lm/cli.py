"""``lm``: the command line. Subcommands mirror the library: data, tokenizer, train, eval, generate.

lmplatform extends this parser with the Ray/MLflow verbs (and a Ray path for ``train``); user mistakes print one
line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lm.checkpoint import CONFIG, METRICS, TOKENIZER, WEIGHTS, CheckpointError, CheckpointManager, load_model
from lm.config import (
    BUILTIN_CORPORA,
    ConfigError,
    ExperimentConfig,
    SampleConfig,
    flatten,
    load_config,
    to_dict,
)
from lm.data import DataError, prepare_data
from lm.evaluate import EvalError, EvalResult, evaluate_hf_baseline, evaluate_split, format_report
from lm.generate import iter_generate
from lm.precision import PRECISIONS, inference_model
from lm.tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from lm.train import RunFinishedError, TrainError, resolve_device, train

log = logging.getLogger("lm")
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, CheckpointError, TokenizerError, TrainError, EvalError, FileNotFoundError,
)  # fmt: skip
Handler = Callable[[argparse.Namespace], int]
FINISHED_HINT = "--restart to train it again, or --out DIR for a new run"  # both work with and without Ray
# Turns what the user typed after `lm eval` / `lm generate` into a checkpoint directory. lm's own understands
# checkpoint and run directories; lmplatform's adds MLflow run ids and models:/ URIs (set_defaults(resolve=...)).
Resolver = Callable[[argparse.Namespace], Path]


def setup_logging(verbose: bool = False) -> None:
    """One log format for every command: time, then the message."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The dotted ``overrides``, plus ``train.out_dir`` when ``--out`` was given."""
    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"train.out_dir={args.out}")
    return overrides


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment from ``config`` plus dotted ``overrides`` (and ``--out``)."""
    return load_config(args.config, overrides_from_args(args))


def print_result(name: str, step: int, seconds: float | None, metrics: dict[str, float]) -> None:
    """The one-line outcome of a training run: steps, training time, val perplexity, bits/byte and loss."""
    took = f", {seconds:.1f}s of training" if seconds is not None else ""
    nan = float("nan")
    print(
        f"\n{name}: step {step}{took} -> val perplexity {metrics.get('val_ppl', nan):.2f}, "
        f"{metrics.get('val_bpb', nan):.4f} bits/byte (val loss {metrics.get('val_loss', nan):.4f})"
    )


def print_best(best: dict[str, float], final_step: int) -> None:
    """When an earlier checkpoint won on dev, its val numbers too: they are what `best` (and the registry) holds."""
    if best and best.get("step") not in (None, final_step) and "val_ppl" in best:
        print(
            f"best checkpoint: step {int(best['step'])} (lowest dev loss) -> val perplexity {best['val_ppl']:.2f}, "
            f"{best['val_bpb']:.4f} bits/byte"
        )


def print_interrupted(why: str | None, step: int, checkpoint: object) -> None:
    """Where a stopped run left its checkpoint, and that the same command resumes it."""
    print(
        f"lm train: stopped ({why or 'on request'}) at step {step}; checkpoint saved at {checkpoint}. "
        "Run the same command again to resume from it.",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------------------------------------------
# Commands


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Train/load the tokenizer and tokenize the corpus into the cache; print what is there."""
    cfg = config_from_args(args)
    data = prepare_data(cfg, progress=True)
    print(f"corpus {cfg.data.corpus}: tokenizer {data.tokenizer_path}")
    for split in data.splits:
        print(f"  {split:>5}: {len(data.tokens(split)):>10,} tokens  {data.num_bytes(split):>11,} bytes")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer on text files."""
    tokenizer = train_tokenizer([Path(f) for f in args.files], args.vocab_size, show_progress=True)
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.vocab_size} tokens)")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    """Show how a text splits into tokens."""
    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(args.text)
    print(json.dumps({"ids": ids, "pieces": [tokenizer.decode([i]) for i in ids]}, ensure_ascii=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train in this process, evaluate the result and print a sample from it."""
    cfg = config_from_args(args)
    try:
        result = train(cfg, resume=not args.restart)
    except RunFinishedError as exc:
        raise TrainError(f"{exc}; {FINISHED_HINT}") from exc
    if result.interrupted:
        print_interrupted("signal", result.step, result.last_checkpoint)
        return 130
    print_result(cfg.name, result.step, result.elapsed, result.metrics)
    print_best(result.best_metrics, result.step)
    print(f"checkpoints: {result.out_dir} (best: {result.best_checkpoint})")
    if result.best_checkpoint is not None and not args.no_sample:
        print_sample(result.best_checkpoint, cfg)
    return 0


def print_sample(checkpoint: Path, cfg: ExperimentConfig) -> None:
    """Print one sample from ``checkpoint`` with the experiment's sampling defaults."""
    s = cfg.sample
    print(
        f"\n--- sample (prompt {s.prompt!r}, temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}) ---"
    )
    stream_sample(checkpoint, s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed, "cpu")
    print("\n---")


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity and bits per byte of a checkpoint (and optionally a Hugging Face baseline) on a split."""
    checkpoint = args.resolve(args)
    device = resolve_device(args.device)
    model, cfg, _ = load_model(checkpoint, device)
    model = inference_model(model, args.precision)
    data = prepare_data(eval_data_config(cfg, checkpoint, args.corpus, args.cache_dir), progress=True)
    if args.split not in data.splits:
        raise DataError(
            f"--split {args.split!r}: corpus {cfg.data.corpus!r} has splits {', '.join(data.splits)}"
        )
    results = [
        evaluate_split(
            model, data.tokens(args.split), data.num_bytes(args.split), cfg.model.block_size,
            batch_size=args.batch_size, device=device, model_name=_model_name(args.checkpoint, args.precision),
            text_name=args.split,
        )
    ]  # fmt: skip
    if args.baseline:
        try:
            results.append(
                evaluate_hf_baseline(
                    args.baseline, data.text(args.split), args.split, args.baseline_window, device=device
                )
            )
        except EvalError:
            _report(results, args.json)  # the model's own numbers are computed: show them, then the error
            raise
    _report(results, args.json)
    return 0


def _model_name(checkpoint: str, precision: str) -> str:
    return checkpoint if precision == "fp32" else f"{checkpoint} ({precision})"


def _report(results: list[EvalResult], json_path: str | None) -> None:
    print(format_report(results))
    if json_path:
        Path(json_path).write_text(json.dumps([r.as_dict() for r in results], indent=2))


def eval_data_config(
    cfg: ExperimentConfig, checkpoint: Path, corpus: str | None = None, cache_dir: str | None = None
) -> ExperimentConfig:
    """The data to evaluate a checkpoint on, on this machine.

    The checkpoint's own tokenizer and its corpus (or ``corpus``); the token cache under ``cache_dir`` (default
    ``./data``), never the cache path saved in the checkpoint, which may be another machine's.
    """
    corpus = corpus or cfg.data.corpus
    if corpus not in BUILTIN_CORPORA:
        corpus = str(Path(corpus).expanduser().resolve())
        if not Path(corpus).exists():
            raise DataError(
                f"corpus {corpus} does not exist here (the checkpoint was trained on {cfg.data.corpus}); "
                f"pass --corpus with a file, a folder or one of {', '.join(BUILTIN_CORPORA)}"
            )
    cache = str(Path(cache_dir or "data").expanduser().resolve())
    tokenizer = dataclasses.replace(cfg.tokenizer, path=str((checkpoint / TOKENIZER).resolve()))
    data = dataclasses.replace(cfg.data, corpus=corpus, cache_dir=cache)
    return dataclasses.replace(cfg, tokenizer=tokenizer, data=data)


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a checkpoint, streaming tokens to the terminal."""
    checkpoint = args.resolve(args)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        stream_sample(
            checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            args.seed + i, args.device, args.precision,
        )  # fmt: skip
        print()
    return 0


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """``args.checkpoint`` as a checkpoint directory: itself, or a run directory's best (else latest) one."""
    return checkpoint_dir(args.checkpoint)


def checkpoint_dir(ref: str) -> Path:
    """A checkpoint directory, or a run directory meaning its ``best/`` checkpoint (said on stderr)."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{ref} does not exist: pass a checkpoint directory (runs/tiny/best) or a run directory (runs/tiny)"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{ref} is a file: pass a checkpoint directory (runs/tiny/best) or a run directory"
        )
    if (path / WEIGHTS).exists() or (path / CONFIG).exists():
        return path  # a checkpoint; load_model names whatever is missing from it
    best = path / "best"
    if (best / WEIGHTS).is_file():
        print(f"{ref}: using its best checkpoint {best}{_step_note(best)}", file=sys.stderr)
        return best
    latest = CheckpointManager(path).latest()
    if latest is not None:
        print(
            f"{ref}: no best checkpoint yet, using its latest {latest}{_step_note(latest)}", file=sys.stderr
        )
        return latest
    contents = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(contents[:8]) + (f" and {len(contents) - 8} more" if len(contents) > 8 else "")
    raise CheckpointError(
        f"{ref} holds no checkpoint (it contains {shown or 'nothing'}): pass a checkpoint directory (with "
        f"{WEIGHTS}, {CONFIG}, {TOKENIZER}) or a run directory with best/ or step-NNNNNN/ in it, such as runs/tiny"
    )


def _step_note(checkpoint: Path) -> str:
    try:
        step = json.loads((checkpoint / METRICS).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    return f" (step {int(step):,})" if isinstance(step, (int, float)) and float(step).is_integer() else ""


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved configuration, one ``key: value`` line per setting."""
    print(format_settings(to_dict(config_from_args(args))))
    return 0


def format_settings(settings: dict[str, Any]) -> str:
    """Nested settings as dotted ``key: value`` lines (YAML scalars: null, true, 3e-3), every key shown."""
    import yaml

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
        return text.removesuffix("\n...").strip()

    return "\n".join(f"{key}: {scalar(value)}" for key, value in flatten(settings).items())


def stream_sample(
    checkpoint: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    device: str,
    precision: str = "fp32",
) -> str:
    """Generate from ``checkpoint`` at ``precision`` (lm.precision), printing text as it is produced; returns the
    completion."""
    SampleConfig(prompt, max_new_tokens, temperature, top_k, top_p, seed=seed)  # ConfigError on bad arguments
    dev = resolve_device(device)
    model, _, tokenizer = load_model(checkpoint, dev)
    model = inference_model(model, precision)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    sys.stdout.write(prompt)
    new: list[int] = []
    printed = ""
    for token in iter_generate(
        model, idx, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id, generator
    ):
        t = int(token[0])
        if t == tokenizer.eos_id:
            break
        new.append(t)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    text = tokenizer.decode(new)
    sys.stdout.write(text[len(printed) :])
    sys.stdout.flush()
    return text


# --------------------------------------------------------------------------------------------------------------
# Parser


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="experiment YAML, e.g. experiments/tiny.yaml")
    else:
        p.add_argument("--config", default=None, help="experiment YAML (default: the built-in tiny preset)")
    # default=[] makes the positional optional (argparse otherwise lists it as required in its errors)
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="optional dotted overrides, e.g. optim.lr=3e-3 train.max_seconds=120",
    )


def _add_precision_arg(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help=f"{verb} with fp32 weights (default), bf16 weights and KV cache, or int8 dynamically quantized "
        "linear layers (CPU only); README 'Faster decoding' says which to use when",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``lm`` parser; each subcommand's handler is in ``set_defaults(handler=...)``."""
    parser = argparse.ArgumentParser(
        prog="lm", description="Train, evaluate and sample small GPT-style models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="prepare corpora and token caches")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("prepare", help="train/load the tokenizer and tokenize the corpus into data/")
    _add_config_args(p, required=False)
    p.set_defaults(handler=cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="train or inspect a byte-level BPE tokenizer")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = tok_sub.add_parser("train", help="train a tokenizer on text files")
    p.add_argument("files", nargs="+")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", default="tokenizer.json")
    p.set_defaults(handler=cmd_tokenizer_train)
    p = tok_sub.add_parser("encode", help="show the tokens of a text")
    p.add_argument("tokenizer")
    p.add_argument("text")
    p.set_defaults(handler=cmd_tokenizer_encode)

    p = sub.add_parser(
        "train",
        help="train a model (in this process with --local)",
        usage="%(prog)s [options] CONFIG [KEY=VALUE ...]",
        description="Train the experiment in CONFIG; KEY=VALUE overrides are optional.",
    )
    _add_config_args(p)
    p.add_argument(
        "--out", help="run directory (in-process: train.out_dir; on Ray: ray.storage_path/ray.run_name)"
    )
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start a new run: first delete this run directory's checkpoints, best/ and run.json",
    )
    p.add_argument("--no-sample", action="store_true", help="skip the sample printed after training")
    p.set_defaults(handler=cmd_train)

    ckpt_help = "a checkpoint directory, or a run directory (its best checkpoint), e.g. runs/tiny"
    p = sub.add_parser("eval", help="perplexity and bits per byte of a checkpoint")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--split", default="val", help="dev, val (default), or test where the corpus has one")
    p.add_argument(
        "--corpus", help="text to score (default: the checkpoint's corpus): a file, folder or name"
    )
    p.add_argument("--cache-dir", help="token cache directory (default: ./data)")
    p.add_argument(
        "--baseline", help="also score a transformers causal LM: 'gpt2' (needs the hub) or a local dir"
    )
    p.add_argument("--baseline-window", type=int, default=None, help="baseline window (default: its context)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    _add_precision_arg(p, "score")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(handler=cmd_eval, resolve=resolve_checkpoint)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    _add_precision_arg(p, "generate")
    p.set_defaults(handler=cmd_generate, resolve=resolve_checkpoint)

    p = sub.add_parser("config", help="show the resolved configuration of an experiment")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = config_sub.add_parser(
        "show",
        help="every setting with its value, after the YAML and the overrides",
        usage="%(prog)s [-h] CONFIG [KEY=VALUE ...]",
    )
    _add_config_args(p)
    p.set_defaults(handler=cmd_config_show)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after options (``--restart optim.lr=1e-3``)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def run(parser: argparse.ArgumentParser, argv: list[str] | None, errors: tuple[type[Exception], ...]) -> int:
    """Parse, dispatch, and turn user errors into one line on stderr with exit code 2."""
    args = parse_args(parser, argv)
    setup_logging(args.verbose)
    try:
        return args.handler(args)
    except errors as exc:
        print(f"lm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lm {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lm`` (and ``python -m lm``)."""
    return run(build_parser(), argv, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
