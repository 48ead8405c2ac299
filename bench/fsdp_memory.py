"""Per-worker memory of data-parallel training: ddp (replicated) against fsdp (sharded), 2 CPU workers.

    python -m bench.fsdp_memory                          # n_embd 512, 8 layers, vocab 8192 (29.4M parameters)
    python -m bench.fsdp_memory --n-embd 768 --n-layer 6 --steps 3

Each strategy runs in its own pair of gloo processes (127.0.0.1), built from lm's own pieces: TransformerLM, the
DDP or :func:`lm.sharding.fsdp_wrapper` wrap, :func:`lm.optim.build_optimizer` after wrapping, forward/backward
on a small random batch, clipping, AdamW. Per worker it reports the bytes of model state this rank holds
(parameters + gradients + AdamW moments, counted tensor by tensor: a DTensor counts its local shard), DDP's
gradient buckets, and the process's resident memory: before the model was built, and its peak (ru_maxrss).
Prints a table and writes bench/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _worker(rank: int, world: int, port: int, strategy: str, args: dict, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lm.config import ModelConfig, OptimConfig
    from lm.model import TransformerLM
    from lm.optim import build_optimizer
    from lm.sharding import fsdp_wrapper, global_norm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = ModelConfig(vocab_size=args["vocab"], block_size=args["block"], n_layer=args["n_layer"],
                      n_head=args["n_head"], n_embd=args["n_embd"])  # fmt: skip
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    baseline = _rss_mib()  # torch, lm and the process group, before any model tensor
    rss = {"baseline": baseline}
    model = TransformerLM(cfg)  # the whole model on every rank first: the same seeded init as one process
    rss["built"] = _rss_mib()
    wrapped = fsdp_wrapper(cpu, None)(model) if strategy == "fsdp" else DistributedDataParallel(model)
    rss["wrapped"] = _rss_mib()
    optimizer = build_optimizer(model, OptimConfig(), cpu)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (args["batch"], cfg.block_size), generator=g)
    state: dict[str, int] = {}
    for _ in range(args["steps"]):
        _, loss = wrapped(x, x)
        loss.backward()
        global_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        params = list(model.parameters())
        state = {
            "params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rss.setdefault("after_step_1", _rss_mib())
    rss["end"] = _rss_mib()
    state["adamw"] = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor))  # fmt: skip
    buckets = 0
    if strategy == "ddp":  # DDP keeps every gradient a second time, in its flat all-reduce buckets
        sizes = str(wrapped._get_ddp_logging_data().get("bucket_sizes", ""))
        buckets = sum(int(v) for v in sizes.replace(",", " ").split())
    row = {
        "strategy": strategy,
        "rank": rank,
        "n_params": model.num_parameters(),
        "params_mib": state["params"] / MIB,
        "grads_mib": state["grads"] / MIB,
        "adamw_mib": state["adamw"] / MIB,
        "model_state_mib": (state["params"] + state["grads"] + state["adamw"]) / MIB,
        "ddp_buckets_mib": buckets / MIB,
        "baseline_rss_mib": baseline,
        **{f"rss_{k}_mib": v for k, v in rss.items() if k != "baseline"},
        "peak_rss_mib": _peak_rss_mib(),
    }
    row["peak_over_baseline_mib"] = row["peak_rss_mib"] - baseline
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: dict, world: int = 2) -> list[dict]:
    """Both strategies, one after the other (each in fresh processes); one row per worker."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for strategy in ("ddp", "fsdp"):
            mp.spawn(_worker, args=(world, _free_port(), strategy, args, out), nprocs=world, join=True)
            rows += [json.loads(Path(out, f"{strategy}-{r}.json").read_text()) for r in range(world)]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the table and the ratio, write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--mmap-threshold", type=int, default=None,
        help="MALLOC_MMAP_THRESHOLD_ for the workers: allocations above it go to mmap and are returned to the OS "
        "when freed, so the peak shows what was live rather than what glibc's heap kept",
    )  # fmt: skip
    opts = parser.parse_args(argv)
    args = {k: getattr(opts, k) for k in ("n_embd", "n_layer", "n_head", "vocab", "block", "batch", "steps")}
    if opts.mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(
            opts.mmap_threshold
        )  # read by each spawned worker at start
        args["mmap_threshold"] = opts.mmap_threshold
    rows = run(args)
    columns = ["strategy", "rank", "params_mib", "grads_mib", "adamw_mib", "model_state_mib", "ddp_buckets_mib",
               "baseline_rss_mib", "rss_built_mib", "rss_wrapped_mib", "rss_after_step_1_mib", "rss_end_mib",
               "peak_rss_mib", "peak_over_baseline_mib"]  # fmt: skip
    print(f"{rows[0]['n_params']:,} parameters, {args}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    mean = {s: sum(r["model_state_mib"] for r in rows if r["strategy"] == s) / 2 for s in ("ddp", "fsdp")}
    peak = {s: max(r["peak_over_baseline_mib"] for r in rows if r["strategy"] == s) for s in ("ddp", "fsdp")}
    ratio = mean["fsdp"] / (mean["ddp"] / 2)
    print(f"fsdp model state per worker / (ddp's / 2) = {ratio:.3f} (must be within 0.85..1.15)")
    print(f"peak RSS over baseline per worker: ddp {peak['ddp']:.0f} MiB, fsdp {peak['fsdp']:.0f} MiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"args": args, "rows": rows, "model_state_ratio_to_half_ddp": ratio, "peak_over_baseline": peak}
    (RESULTS / "fsdp_memory.json").write_text(json.dumps(summary, indent=2))
    return 0 if 0.85 <= ratio <= 1.15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
