"""Benchmarks: training throughput against transformers' GPT-2, KV-cache generation, MFU, serving under load, and
lm train's time to its first step.

    python -m bench.run                       # everything, on CPU with the current thread count (serve: minutes)
    python -m bench.run --only startup              # lm train on Ray to its first step (bench/startup.py, minutes)
    python -m bench.run --only share                # lm train's steps on Ray vs --local (bench/ray_share.py, 20 min)
    python -m bench.run --only train,generate,mfu   # without the serving load test
    python -m bench.run --only train --device cuda --amp bf16
    python -m bench.run --only fsdp                 # ddp vs fsdp memory per worker (bench/fsdp_memory.py)

Speeds of two models are measured alternately in one process (the same process can run 25% faster or slower
than the next), and the ratio is the number to compare. Prints tables and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.config import ModelConfig
from lm.generate import generate
from lm.model import TransformerLM

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_SHAPES = {  # name: (model overrides, batch, block)
    "tiny": (dict(n_embd=128, n_layer=2, n_head=4), 32, 128),
    "n384-l6": (dict(n_embd=384, n_layer=6, n_head=6), 8, 256),
}


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpt2_like(cfg: ModelConfig) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel at the same shape (learned positions, no dropout, tied embeddings, SDPA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.mlp_hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
    )  # fmt: skip
    hf._attn_implementation = "sdpa"  # its fastest attention here (transformers 5 picks it too)
    return GPT2LMHeadModel(hf)


def train_step_fn(model: torch.nn.Module, batch: int, block: int, vocab: int, device: torch.device, amp: str | None,
                  kind: str) -> Callable[[], None]:  # fmt: skip
    """One forward + backward + AdamW step on a fixed random batch.

    ``kind``: ``lm`` (our training step: the loss without logits), ``lm-logits`` (logits, then F.cross_entropy),
    ``gpt2`` (transformers at its best: SDPA attention, one F.cross_entropy on its logits), ``gpt2-labels``
    (its own loss via ``labels=``, which shifts and copies the logits), ``nanogpt`` (nanoGPT's ``model(x, y)``).
    """
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def loss() -> torch.Tensor:
        if kind == "gpt2":
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        if kind == "gpt2-labels":
            return model(input_ids=x, labels=x).loss
        return model(x, y, need_logits=kind == "lm-logits")[1] if kind.startswith("lm") else model(x, y)[1]

    def step() -> None:
        with ctx():
            value = loss()
        scaler.scale(value).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per step over ``n`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def nanogpt_model(cfg: ModelConfig, checkout: Path) -> torch.nn.Module:
    """nanoGPT's GPT (``model.py`` of a checkout of github.com/karpathy/nanoGPT) at the same shape."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    if spec is None or not (checkout / "model.py").is_file():
        raise SystemExit(f"--nanogpt {checkout}: no model.py there (give a checkout of karpathy/nanoGPT)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conf = module.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=True)  # fmt: skip
    return module.GPT(conf)


def bench_train(device: torch.device, amp: str | None, rounds: int, steps: int, compile_: bool,
                nanogpt: Path | None = None) -> list[dict]:  # fmt: skip
    """Tokens/s of our training step against GPT2LMHeadModel's (and nanoGPT's), per shape.

    The models take turns, a few steps each, in an order that rotates every round; a ratio is taken within each
    round (neighbours in time share the VM's speed of that moment), and the median round's ratio is reported
    with the range. ``compile_`` compiles every model, each warmed up (compiled) before any clock starts.
    """
    rows = []
    for name, (over, batch, block) in TRAIN_SHAPES.items():
        cfg = ModelConfig(vocab_size=2048, block_size=block, **over)
        kinds = ["lm", "lm-logits", "gpt2", "gpt2-labels"] + (["nanogpt"] if nanogpt is not None else [])
        fns, warm_s = {}, {}
        for kind in kinds:
            torch.manual_seed(0)
            if kind.startswith("lm"):
                model = TransformerLM(cfg)
            else:
                model = gpt2_like(cfg) if kind.startswith("gpt2") else nanogpt_model(cfg, nanogpt)
            t0 = time.perf_counter()
            fns[kind] = train_step_fn(torch.compile(model) if compile_ else model, batch, block, cfg.vocab_size,
                                      device, amp, kind)  # fmt: skip
            time_steps(fns[kind], 3, device)  # warm up allocators, kernels, compilation
            warm_s[kind] = time.perf_counter() - t0
        times: dict[str, list[float]] = {kind: [] for kind in fns}
        order = list(fns)
        for r in range(rounds):
            for kind in order[r % len(order) :] + order[: r % len(order)]:
                times[kind].append(time_steps(fns[kind], steps, device))
        tokens = batch * block
        flops = training_flops_per_token(cfg, block)
        row = {"shape": name, "batch": batch, "block": block, "params": TransformerLM(cfg).num_parameters(),
               "flops_per_token": flops, "warmup_s": warm_s}  # fmt: skip
        for kind, ts in times.items():
            key = kind.replace("-", "_")
            row[f"{key}_tokens_per_s"] = tokens / statistics.median(ts)
            ratios = sorted(t_gpt2 / t for t, t_gpt2 in zip(ts, times["gpt2"]))
            row[f"{key}_ratio"] = statistics.median(ratios)
            row[f"{key}_ratio_range"] = (ratios[0], ratios[-1])
        # the earlier results' keys: ours = our training step
        row["ours_tokens_per_s"], row["ratio"] = row["lm_tokens_per_s"], row["lm_ratio"]
        row["ours_gflops"] = row["lm_tokens_per_s"] * flops / 1e9
        rows.append(row)
    return rows


def training_flops_per_token(cfg: ModelConfig, block: int) -> float:
    """6 x matmul parameters (the output projection included, the embedding lookup not) + attention's 12·L·C·T."""
    per_layer = 4 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * cfg.mlp_hidden
    matmul_params = cfg.n_layer * per_layer + cfg.vocab_size * cfg.n_embd
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * block


def bench_matmul_peak(device: torch.device, size: int = 1024, n: int = 20) -> float:
    """Measured fp32 matmul GFLOP/s: the denominator of MFU."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return 2 * size**3 / best / 1e9


PRESETS = Path(__file__).resolve().parents[1] / "experiments"


def bench_generate(
    device: torch.device,
    prompt: int = 16,
    presets: tuple[str, ...] = ("tiny", "small", "medium"),
    precisions: tuple[str, ...] = ("fp32", "bf16", "int8"),
    rounds: int = 3,
) -> tuple[list[dict], list[dict]]:
    """Tokens/s of generation with the KV cache against full recomputation, at each preset's own block_size.

    Two lengths per preset: up to block_size (prompt + new tokens fill the context: the cache's whole gain), and
    twice block_size, where the cache is dropped once the context outgrows block_size and every further token
    recomputes the last block_size positions (sinusoidal positions shift, so a cache cannot slide).
    Second table: batch 1 up to block_size on the last preset (medium: n_embd 384, block 256), cached decoding
    at each inference precision (lm.precision) against fp32 recomputation, alternating in one process.
    """
    from lm.config import load_config

    rows = []
    for name in presets:
        cfg = load_config(PRESETS / f"{name}.yaml").model
        torch.manual_seed(0)
        model = TransformerLM(cfg).to(device).eval()
        for batch, new_tokens in (
            (1, cfg.block_size - prompt),
            (8, cfg.block_size - prompt),
            (1, 2 * cfg.block_size),
        ):
            idx = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
            row = {"shape": name, "block": cfg.block_size, "batch": batch, "new_tokens": new_tokens}
            for use_cache in (True, False):
                g = torch.Generator(device=device).manual_seed(0)
                generate(model, idx, 8, top_k=50, generator=g, use_cache=use_cache)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                generate(model, idx, new_tokens, top_k=50, generator=g, use_cache=use_cache)
                sync(device)
                row["cache_tokens_per_s" if use_cache else "recompute_tokens_per_s"] = (
                    batch * new_tokens / (time.perf_counter() - t0)
                )
            row["speedup"] = row["cache_tokens_per_s"] / row["recompute_tokens_per_s"]
            rows.append(row)
    return rows, bench_precisions(device, load_config(PRESETS / f"{presets[-1]}.yaml").model, prompt, precisions,
                                  rounds)  # fmt: skip


def bench_precisions(
    device: torch.device, cfg: ModelConfig, prompt: int, precisions: tuple[str, ...], rounds: int
) -> list[dict]:
    """Batch-1 tokens/s up to block_size: cached at each precision, recomputed in fp32 and at that precision;
    the same seeded sampling everywhere, every measurement once per round in turn; medians over the rounds.

    A last row, ``floor``: the same depth, heads and vocabulary at 8 channels per head (fp32), whose matrices are
    too small to matter: the per-token cost of dispatching the ops that no precision removes.
    """
    from lm.precision import inference_model

    torch.manual_seed(0)
    fp32 = TransformerLM(cfg).to(device).eval()
    models = {p: inference_model(fp32, p) for p in precisions}
    narrow = dataclasses.replace(cfg, n_embd=8 * cfg.n_head, mlp_dim=32 * cfg.n_head)
    models["floor"] = TransformerLM(narrow).to(device).eval()
    new_tokens = cfg.block_size - prompt
    idx = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)

    def tokens_per_s(model: TransformerLM, use_cache: bool) -> float:
        g = torch.Generator(device=device).manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        generate(model, idx, new_tokens, top_k=50, generator=g, use_cache=use_cache)
        sync(device)
        return new_tokens / (time.perf_counter() - t0)

    # every precision cached and recomputed; the floor only cached (its recomputation says nothing)
    runs = [(p, use_cache) for p in models for use_cache in (True, False) if p != "floor" or use_cache]
    for p, use_cache in runs:  # warm-up: allocators, oneDNN primitives, packed weights
        generate(models[p], idx, 8, top_k=50, generator=torch.Generator(device=device), use_cache=use_cache)
    speeds: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for _ in range(rounds):
        for p, use_cache in runs:
            speeds[p, use_cache].append(tokens_per_s(models[p], use_cache))
    recompute_fp32 = statistics.median(speeds["fp32", False]) if "fp32" in models else float("nan")
    rows = []
    for p in models:
        cached = statistics.median(speeds[p, True])
        recomputed = statistics.median(speeds[p, False]) if (p, False) in speeds else float("nan")
        rows.append({
            "precision": p, "n_embd": models[p].cfg.n_embd, "block": cfg.block_size, "batch": 1,
            "new_tokens": new_tokens,
            "cache_tokens_per_s": cached, "cache_runs": speeds[p, True], "recompute_tokens_per_s": recomputed,
            "speedup_vs_fp32_recompute": cached / recompute_fp32, "speedup_vs_own_recompute": cached / recomputed,
        })  # fmt: skip
    return rows


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """A plain right-aligned table; ``columns`` are (key, format spec) pairs."""
    print(f"\n{title}")
    table = [[key for key, _ in columns]] + [[format(r[key], fmt) for key, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


SECTIONS = {"train", "generate", "mfu", "serve", "startup", "share", "fsdp"}


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, print tables, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default="train,generate,mfu,serve,startup",
        help="a comma-separated subset of train,generate,mfu,serve,startup (lm train's time to its first step, "
        "bench/startup.py), or fsdp (ddp vs fsdp memory per worker, bench/fsdp_memory.py) or share (lm train's "
        "steps on Ray against --local in 120 s, bench/ray_share.py; about 20 minutes); those two not in the default",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9, help="train: turns per model")
    parser.add_argument("--steps", type=int, default=4, help="train: training steps per turn")
    parser.add_argument(
        "--nanogpt", type=Path, default=None,
        help="train: a checkout of github.com/karpathy/nanoGPT, whose model.py joins the benchmark",
    )  # fmt: skip
    parser.add_argument(
        "--generate-rounds", type=int, default=3, help="generate: alternating rounds per precision"
    )
    parser.add_argument(
        "--precisions", default="fp32,bf16,int8", help="generate: inference precisions of the batch-1 table"
    )
    parser.add_argument(
        "--presets", default="tiny,small,medium", help="generate: presets (the last one: per precision)"
    )
    parser.add_argument("--name", default=None, help="results file name (default: from device and options)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = set(args.only.split(","))
    unknown = sorted(only - SECTIONS)
    if unknown:
        parser.error(
            f"--only {args.only}: unknown {', '.join(unknown)} (known: {', '.join(sorted(SECTIONS))})"
        )
    results: dict = {
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "amp": args.amp, "compile": args.compile,
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg(),
    }  # fmt: skip
    print(f"device {device}, {results['threads']} threads, torch {torch.__version__}, amp {args.amp or 'off'}, "
          f"compile {args.compile}, load average {results['loadavg_before'][0]:.2f}")  # fmt: skip
    if "mfu" in only or "train" in only:
        results["matmul_peak_gflops"] = bench_matmul_peak(device)
        print(f"fp32 matmul peak: {results['matmul_peak_gflops']:.0f} GFLOP/s")
    if "train" in only:
        rows = bench_train(device, args.amp, args.rounds, args.steps, args.compile, args.nanogpt)
        for r in rows:
            r["mfu"] = r["ours_gflops"] / results["matmul_peak_gflops"]
            r["gpt2_mfu"] = (
                r["gpt2_tokens_per_s"] * r["flops_per_token"] / 1e9 / results["matmul_peak_gflops"]
            )
        results["train"] = rows
        kinds = [k for k in ("lm", "lm_logits", "gpt2_labels", "nanogpt") if f"{k}_ratio" in rows[0]]
        for r in rows:
            for k in kinds:
                low, high = r[f"{k}_ratio_range"]
                r[f"{k}_vs_gpt2"] = f"{r[f'{k}_ratio']:.2f}x ({low:.2f}-{high:.2f})"
        print_table(
            "training throughput (forward + backward + AdamW), models taking turns in one process; ratios to "
            "transformers' GPT-2 (SDPA, one cross_entropy on its logits): median round (range)",
            rows,
            [("shape", ""), ("batch", "d"), ("block", "d"), ("params", ","), ("ours_tokens_per_s", ",.0f"),
             ("gpt2_tokens_per_s", ",.0f")] + [(f"{k}_vs_gpt2", "") for k in kinds]
            + [("mfu", ".1%"), ("gpt2_mfu", ".1%")],
        )  # fmt: skip
        print("lm: our training step (LinearCrossEntropy, no logits); lm_logits: logits then F.cross_entropy; "
              "gpt2_labels: GPT-2's own loss via labels=")  # fmt: skip
    if "generate" in only:
        rows, by_precision = bench_generate(
            device, presets=tuple(args.presets.split(",")), precisions=tuple(args.precisions.split(",")),
            rounds=args.generate_rounds,
        )  # fmt: skip
        results["generate"] = rows
        print_table("generation after a 16-token prompt, at each preset's block_size (and past it)", rows, [
            ("shape", ""), ("block", "d"), ("batch", "d"), ("new_tokens", "d"), ("cache_tokens_per_s", ",.0f"),
            ("recompute_tokens_per_s", ",.0f"), ("speedup", ".1f"),
        ])  # fmt: skip
        results["generate_precision"] = by_precision
        print_table("batch-1 cached decoding per precision (lm.precision) vs recomputation, alternating", by_precision, [
            ("precision", ""), ("n_embd", "d"), ("block", "d"), ("new_tokens", "d"), ("cache_tokens_per_s", ",.0f"),
            ("recompute_tokens_per_s", ",.0f"), ("speedup_vs_fp32_recompute", ".2f"),
            ("speedup_vs_own_recompute", ".2f"),
        ])  # fmt: skip
    if "serve" in only:  # its own results file (serve.json): it starts lm serve once per batching mode
        from bench.serve_load import main as serve_main

        serve_main([])
    if "startup" in only:  # its own results file (startup.json): lm train on Ray, prestarted or not, in turns
        from bench.startup import main as startup_main

        startup_main([])
    if "share" in only:  # its own results file (ray_share.json): lm train on Ray and --local, in turns
        from bench.ray_share import main as share_main

        share_main([])
    if "fsdp" in only:  # its own results file (fsdp_memory.json): two pairs of gloo worker processes
        from bench.fsdp_memory import main as fsdp_main

        fsdp_main([])
    results["loadavg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    name = args.name or f"{device.type}-{args.amp or 'fp32'}{'-compile' if args.compile else ''}"
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
