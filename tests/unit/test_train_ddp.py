"""lm/train.py's own data-parallel path: two real gloo processes, DDP with ``no_sync`` accumulation, per-rank RNG
across a resume, a stop request that every rank agrees on, and ranks told to resume from different steps, or one
rank that cannot resume, which must all refuse rather than deadlock (no Ray: the launcher is a plain process group)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lm.checkpoint import CheckpointError, load_checkpoint
from lm.config import load_config
from lm.train import DistributedContext, Hooks, TrainError, train

WORLD = 2


def _all_max(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class _StopAt(Hooks):
    """Asks only rank 1 to stop: the loop must still stop every rank at the same step. Rank 0 is slow to finish its
    last checkpoint (a second, then a marker file): no rank may leave train() before it is done."""

    def __init__(self, rank: int, step: int, marker: Path) -> None:
        self.rank, self.step, self.seen, self.marker = rank, step, 0, marker

    def on_log(self, step: int, metrics: dict) -> None:
        self.seen = step

    def should_stop(self) -> bool:
        return self.rank == 1 and self.seen >= self.step

    def on_checkpoint(self, step: int, metrics: dict, path: Path | None) -> None:
        if self.rank == 0 and metrics.get("interrupted"):
            time.sleep(1.0)
            self.marker.write_text("rank 0 is done")


def _worker(rank: int, init_file: str, phases: list[tuple[str, list[str]]], resume_from: str) -> None:
    torch.set_num_threads(1)
    # A hang (ranks out of step) fails in 2 minutes instead of gloo's default 30
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=2)
    )
    try:
        ctx = DistributedContext(
            rank=rank, world_size=WORLD, device=torch.device("cpu"), wrap_model=DistributedDataParallel,
            all_max=_all_max,
        )  # fmt: skip
        for kind, overrides in phases:
            cfg = load_config(None, overrides)
            # rank 0 resumes from a checkpoint, rank 1 starts fresh: both refuse at once
            if kind == "disagree":
                resume = Path(resume_from) if rank == 0 else False
                with pytest.raises(TrainError, match="the ranks disagree on where to resume"):
                    train(cfg, dist=ctx, resume=resume, handle_signals=False)
                continue
            # rank 1 cannot read its checkpoint: rank 1 raises its error, rank 0 says rank 1 failed
            if kind == "one-fails":
                missing = Path(resume_from).parent / "step-999999"
                error = (
                    pytest.raises(CheckpointError, match="does not exist")
                    if rank == 1
                    else pytest.raises(TrainError, match="rank 1 could not")
                )
                with error:
                    train(cfg, dist=ctx, resume=missing if rank == 1 else False, handle_signals=False)
                continue
            marker = Path(cfg.train.out_dir).parent / "rank-0-done"
            hooks = _StopAt(rank, 4, marker) if kind == "stop" else None
            result = train(cfg, dist=ctx, hooks=hooks, handle_signals=False)
            if kind == "stop":
                assert result.interrupted and result.step == 4, (rank, result.step)
                assert marker.exists(), rank  # nobody returned before rank 0's last checkpoint was complete
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_and_resume_bit_identically(toy_args, tmp_path: Path) -> None:
    one_step = dict(train__max_steps=1, optim__warmup_steps=0, optim__grad_clip=None, optim__weight_decay=0.0)
    accum = toy_args(
        train__batch_size=4, train__grad_accum_steps=2, train__out_dir=tmp_path / "ddp", **one_step
    )
    dropout = dict(
        model__dropout=0.1, train__max_steps=8, train__checkpoint_interval=4, train__log_interval=1
    )
    straight = toy_args(train__out_dir=tmp_path / "straight", **dropout)
    halves = toy_args(train__out_dir=tmp_path / "halves", **dropout)
    disagree = toy_args(train__out_dir=tmp_path / "disagree", **dropout)
    # Rank 1 leaves "stop" while rank 0 still replaces step-000004: "run" must find it, on every rank.
    phases = [
        ("run", accum), ("run", straight), ("stop", halves), ("run", halves), ("disagree", disagree),
        ("one-fails", disagree),
    ]  # fmt: skip
    resume_from = str(tmp_path / "straight" / "step-000004")
    mp.spawn(_worker, args=(str(tmp_path / "init"), phases, resume_from), nprocs=WORLD, join=True)
    assert not list((tmp_path / "disagree").glob("step-*"))  # both refused before anything was written

    # 2 ranks x 4 sequences x 2 micro-batches (no_sync on the first) == one process with 16 sequences
    single = train(
        load_config(None, toy_args(train__batch_size=16, train__out_dir=tmp_path / "one", **one_step))
    )
    adam = load_checkpoint(tmp_path / "ddp" / "step-000001").trainer_state()["optimizer"]["state"]
    ref = load_checkpoint(single.last_checkpoint).trainer_state()["optimizer"]["state"]
    for key in ref:
        torch.testing.assert_close(adam[key]["exp_avg"], ref[key]["exp_avg"], rtol=1e-4, atol=1e-8)

    # stopped at step 4 by one rank, resumed: every rank's dropout stream continued as if never stopped
    a = load_checkpoint(tmp_path / "straight" / "step-000008")
    b = load_checkpoint(tmp_path / "halves" / "step-000008")
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name
    rng = b.trainer_state()["rng"]
    assert len(rng) == WORLD and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one stream per rank


@pytest.fixture(autouse=True)
def _fresh_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
