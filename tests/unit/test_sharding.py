"""lm/sharding.py through lm/train.py: FSDP2 on two real gloo processes (no Ray: the launcher is a plain process
group), checked against one process on the combined batch, plus sharded checkpoints: tie, crash and resume,
resharding onto one process."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lm.checkpoint import TRAINER, WEIGHTS, load_checkpoint, load_model
from lm.config import load_config
from lm.model import TransformerLM
from lm.optim import build_optimizer
from lm.sharding import (
    SHARDS,
    ShardingError,
    fsdp_wrapper,
    full_weights,
    is_sharded,
    load_shards,
    load_unsharded,
)
from lm.train import DistributedContext, Hooks, train

WORLD = 2
CPU = torch.device("cpu")


def _all_max(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class _CrashAt(Hooks):
    """Every rank raises at the same log step, as a killed worker group would stop (no checkpoint there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, step: int, metrics: dict) -> None:
        if step == self.step:
            raise RuntimeError(f"crash at step {step}")


def _context(rank: int, world: int, kind: str, own: Path | None = None) -> DistributedContext:
    wrap = fsdp_wrapper(CPU, None) if kind.startswith("fsdp") else DistributedDataParallel
    return DistributedContext(rank=rank, world_size=world, device=CPU, wrap_model=wrap, all_max=_all_max,
                              own_checkpoint_dir=own)  # fmt: skip


def _check_tie(cfg_overrides: list[str], ckpt: Path | None) -> None:
    """Tied after sharding, after a step, and after loading a sharded checkpoint back (every rank)."""
    cfg = load_config(None, cfg_overrides)
    torch.manual_seed(0)
    model = fsdp_wrapper(CPU, None)(TransformerLM(cfg.model))
    assert is_sharded(model) and model.lm_head.weight is model.tok_emb.weight
    if ckpt is not None:
        optimizer = build_optimizer(model, cfg.optim, CPU)
        load_shards(ckpt, model, optimizer)
        assert model.lm_head.weight is model.tok_emb.weight
        full = full_weights(model)
        if dist.get_rank() == 0:
            saved = load_checkpoint(ckpt).weights
            assert "lm_head.weight" not in saved  # stored once, like every unsharded checkpoint
            for name, tensor in saved.items():
                assert torch.equal(full[name], tensor), name


def _check_unsharded_load(cfg_overrides: list[str], ckpt: Path, copy_to: Path) -> None:
    """A ddp checkpoint loaded into a sharded model: gathered back, weights and AdamW state are the checkpoint's.
    Rank 0 then copies the run for the next phase to continue sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    cfg = load_config(None, cfg_overrides)
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    model = fsdp_wrapper(CPU, None)(TransformerLM(cfg.model))
    optimizer = build_optimizer(model, cfg.optim, CPU)
    plain = load_checkpoint(ckpt)
    load_unsharded(model, optimizer, plain.weights, plain.trainer_state()["optimizer"])
    assert model.lm_head.weight is model.tok_emb.weight
    full = full_weights(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    adam = get_optimizer_state_dict(model, optimizer, options=options)  # {} on rank 1 (cpu_offload)
    if dist.get_rank() == 0:
        adam = adam["state"]
        for name, tensor in plain.weights.items():
            assert torch.equal(full[name], tensor), name
        ref = _adam_state(ckpt, cfg_overrides)
        assert adam.keys() == ref.keys()
        for name, moments in ref.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(adam[name][key], moments[key]), (name, key)
        shutil.copytree(ckpt.parent, copy_to)
    dist.barrier()


def _worker(rank: int, world: int, init_file: str, phases: list[tuple[str, list[str], str | None]]) -> None:
    torch.set_num_threads(1)
    # A hang (ranks out of step) fails in 2 minutes instead of gloo's default 30
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(minutes=2)
    )
    try:
        for kind, overrides, extra in phases:
            if kind == "tie":
                _check_tie(overrides, Path(extra) if extra else None)
                continue
            if kind == "unsharded":
                _check_unsharded_load(
                    overrides, Path(extra), Path(load_config(None, overrides).train.out_dir)
                )
                continue
            if (
                kind == "fsdp-split" and rank == 1
            ):  # as if rank 1 ran on a machine without rank 0's filesystem
                overrides = [*overrides, f"train.out_dir={extra}"]
            cfg = load_config(None, overrides)
            own = Path(extra) if kind == "fsdp-own" else None
            hooks = _CrashAt(int(extra)) if kind == "fsdp-crash" else None
            try:
                result = train(cfg, dist=_context(rank, world, kind, own), hooks=hooks, handle_signals=False)
            except RuntimeError as exc:
                expected = {"fsdp-crash": "crash at step", "fsdp-split": "where rank 0 cannot see them",
                            "fsdp-refused": "sharded (FSDP) training does not support optim.ema_decay=0.5 (the "
                                            "weight average would need its own shards), optim.optimizer=muon"}  # fmt: skip
                assert kind in expected and expected[kind] in str(exc), exc
                continue
            assert kind != "fsdp-refused", "a library caller sharding through its own context was not refused"
            if rank == 0:
                Path(cfg.train.out_dir, "history.json").write_text(json.dumps(result.history))
    finally:
        dist.destroy_process_group()


def _losses(out_dir: Path, key: str = "train_loss") -> dict[int, float]:
    history = json.loads((out_dir / "history.json").read_text())
    return {int(h["step"]): h[key] for h in history if key in h}


def _adam_state(ckpt: Path, cfg_overrides: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's exp_avg / exp_avg_sq by parameter name, from any checkpoint (sharded ones reshard onto 1 process)."""
    cfg = load_config(None, cfg_overrides)
    model = TransformerLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, CPU)
    if (ckpt / SHARDS).is_dir():
        load_shards(ckpt, model, optimizer)
    else:
        optimizer.load_state_dict(load_checkpoint(ckpt).trainer_state()["optimizer"])
    by_param = {id(p): n for n, p in model.named_parameters()}
    return {by_param[id(p)]: s for p, s in optimizer.state.items()}


def test_fsdp_and_ddp_on_two_ranks_match_one_process_and_sharded_checkpoints_round_trip(
    toy_args, tmp_path: Path
) -> None:
    # 3 steps, 2 micro-batches each (the first without gradient sync), clipping active (the pre-clip norm is ~0.56
    # against a 0.5 limit: a norm taken over one rank's shard only would clip differently), weight decay on.
    parity = dict(train__max_steps=3, train__log_interval=1, optim__warmup_steps=0, optim__grad_clip=0.5)
    two = dict(train__batch_size=4, train__grad_accum_steps=2, **parity)
    fsdp_args = toy_args(train__out_dir=tmp_path / "fsdp", **two)
    ddp_args = toy_args(train__out_dir=tmp_path / "ddp", **two)
    # a crash at step 6 (after the checkpoint at 4), resumed, against an uninterrupted run; dropout on, so the
    # per-rank RNG streams matter
    resume = dict(model__dropout=0.1, train__max_steps=8, train__checkpoint_interval=4, train__log_interval=1)
    straight = toy_args(train__out_dir=tmp_path / "straight", **resume)
    crashed = toy_args(train__out_dir=tmp_path / "crashed", **resume)
    # the ddp run (3 steps) continued to 5 as fsdp: its plain checkpoint loads into the shards
    switch = toy_args(train__out_dir=tmp_path / "switch", **(two | {"train__max_steps": 5}))
    own = toy_args(
        train__out_dir=tmp_path / "own", **(resume | {"train__max_steps": 4, "optim__warmup_steps": 2})
    )
    phases = [
        ("tie", fsdp_args, None),
        ("fsdp", fsdp_args, None),
        ("ddp", ddp_args, None),
        ("fsdp", straight, None),
        ("fsdp-crash", crashed, "6"),
        ("fsdp", crashed, None),
        ("tie", fsdp_args, str(tmp_path / "fsdp" / "step-000003")),
        ("fsdp-own", own, str(tmp_path / "rank-1-own")),
        ("unsharded", switch, str(tmp_path / "ddp" / "step-000003")),
        ("fsdp", switch, None),
        (
            "fsdp-split",
            toy_args(train__out_dir=tmp_path / "split", train__max_steps=2, optim__warmup_steps=0),
            str(tmp_path / "elsewhere"),
        ),
    ]
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), phases), nprocs=WORLD, join=True)

    # 2 ranks x 4 sequences x 2 micro-batches == one process with 16 sequences (the same blocks each step)
    one_args = toy_args(train__batch_size=16, train__out_dir=tmp_path / "one", **parity)
    one = train(load_config(None, one_args))
    ref_norms = {int(h["step"]): h["grad_norm"] for h in one.history if "grad_norm" in h}
    ref_adam = _adam_state(one.last_checkpoint, one_args)
    ref_weights = load_checkpoint(one.last_checkpoint).weights
    # Tolerances: the same sums in another order (per-rank means, then a mean of 2) differ by a few fp32 ulps
    # (~1e-7 relative): gradient norms to 1e-5 and Adam's moments to 1e-4 relative. The weights to 1e-5 absolute:
    # Adam moves each weight by up to lr (3e-3) per step whatever its gradient, and for an element whose gradient is
    # ~0 a rounding difference changes m / sqrt(v) a lot (measured: 1.5e-6 on 1 of 4096 elements), so 1e-5 is
    # 0.1% of the 9e-3 three steps can move. A reduction that sums instead of averaging (pytorch#162338) doubles
    # the gradient norms and exp_avg and quadruples exp_avg_sq; Adam's update is scale-free, so the weights alone
    # would not show it: that is why norms and moments are compared.
    for kind in ("fsdp", "ddp"):
        ckpt = tmp_path / kind / "step-000003"
        norms = _losses(tmp_path / kind, "grad_norm")
        assert norms.keys() == ref_norms.keys() == {1, 2, 3}
        for step, norm in ref_norms.items():
            assert norms[step] == pytest.approx(norm, rel=1e-5), (kind, step)
        adam = _adam_state(ckpt, fsdp_args)
        assert adam.keys() == ref_adam.keys()
        for name, ref in ref_adam.items():
            torch.testing.assert_close(adam[name]["exp_avg"], ref["exp_avg"], rtol=1e-4, atol=1e-8, msg=name)
            torch.testing.assert_close(adam[name]["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-4, atol=1e-12,
                                       msg=name)  # fmt: skip
        weights = load_checkpoint(ckpt).weights
        assert weights.keys() == ref_weights.keys()
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, rtol=1e-5, atol=1e-5, msg=f"{kind} {name}")

    # the fsdp checkpoint: the usual directory plus shards/, and its export reads like any other
    sharded = tmp_path / "fsdp" / "step-000003"
    names = {p.name for p in (sharded / SHARDS).iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"} <= names
    trainer = load_checkpoint(sharded).trainer_state()
    assert trainer["sharded"] and trainer["optimizer"] is None
    model, _, _ = load_model(tmp_path / "fsdp" / "best")  # what lm eval / generate / serve read
    assert model.lm_head.weight is model.tok_emb.weight

    # crashed at 6, resumed from step 4: the same step counter and, with fixed seeds, the same losses and weights
    # (bit-identical here: same world size, same reduction order; tolerance 0)
    after = _losses(tmp_path / "crashed")  # what the resumed call trained
    assert after == {step: loss for step, loss in _losses(tmp_path / "straight").items() if step > 4}
    assert sorted(after) == [5, 6, 7, 8]
    a = load_checkpoint(tmp_path / "straight" / "step-000008").weights
    b = load_checkpoint(tmp_path / "crashed" / "step-000008").weights
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name

    # ddp -> fsdp: the continued run trained steps 4 and 5 and wrote a sharded checkpoint
    assert sorted(_losses(tmp_path / "switch")) == [4, 5]
    assert (tmp_path / "switch" / "step-000005" / SHARDS / ".metadata").is_file()

    # a rank whose shards land where rank 0 cannot see them: every rank stops with the reason, nothing is renamed
    assert not (tmp_path / "split" / "step-000002").exists()
    assert (tmp_path / "elsewhere" / ".tmp-step-000002-staging" / SHARDS / "__1_0.distcp").is_file()

    # own_checkpoint_dir: rank 1 wrote its part elsewhere (what Ray Train uploads and merges); merged, it loads
    merged = tmp_path / "own" / "step-000004"
    assert not (merged / SHARDS / "__1_0.distcp").exists()
    part = tmp_path / "rank-1-own" / "step-000004" / SHARDS
    assert {p.name for p in part.iterdir()} == {"__1_0.distcp", "rank-00001.pt"}
    for file in part.iterdir():
        shutil.copy(file, merged / SHARDS / file.name)
    _adam_state(merged, own)

    # 2 -> 1 process: the straight run's step-4 shards resume under FSDP on a world of 1 and train on
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    shutil.copytree(tmp_path / "straight" / "step-000004", resharded / "step-000004")
    shutil.copy(tmp_path / "straight" / "run.json", resharded / "run.json")
    args = toy_args(train__out_dir=resharded, **resume)
    # ("tie" loads the shards into a sharded world-1 model and compares them with the checkpoint's full weights)
    # then what FSDP cannot shard is refused to a library caller too (lmplatform refuses it before Ray starts)
    refused = toy_args(train__out_dir=tmp_path / "refused", optim__optimizer="muon", optim__ema_decay=0.5)
    phases = [
        ("tie", args, str(resharded / "step-000004")),
        ("fsdp", args, None),
        ("fsdp-refused", refused, None),
    ]
    mp.spawn(_worker, args=(1, str(tmp_path / "init1"), phases), nprocs=1, join=True)
    losses = _losses(resharded)
    assert min(losses) == 5 and max(losses) == 8  # continued at step 5
    assert (resharded / "step-000008" / TRAINER).is_file() and (resharded / "step-000008" / WEIGHTS).is_file()


def test_fsdp_refuses_what_it_cannot_do(toy_args, tmp_path: Path) -> None:
    with pytest.raises(ShardingError, match="fp16"):
        fsdp_wrapper(CPU, torch.float16)
    with pytest.raises(ShardingError, match="process group"):
        fsdp_wrapper(CPU, None)(TransformerLM(load_config(None, toy_args()).model))


@pytest.fixture(autouse=True)
def _fresh_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
