"""Fully sharded data parallelism (FSDP2) for :class:`lm.model.TransformerLM`, and its sharded checkpoints.

A launcher that has a process group (Ray Train, torchrun, a test's gloo group) puts :func:`fsdp_wrapper` into
``DistributedContext.wrap_model``; the loop then trains the sharded model like any other: parameters, gradients
and AdamW state live as ``DTensor`` shards (1/world of each per rank), each block's parameters are all-gathered
for its forward and backward and freed again, and gradients are reduce-scattered.

Checkpoints of a sharded model keep the usual directory (``model.safetensors`` gathered in full, ``trainer.pt``
without the optimizer, config, tokenizer, metrics) plus ``shards/``: the model and optimizer written by
``torch.distributed.checkpoint`` (one ``__<rank>_0.distcp`` per rank and a ``.metadata`` from rank 0, names that
never collide, so parts written into separate directories merge into one) and one ``rank-NNNNN.pt`` per rank
with that rank's RNG state. DCP reshards on load: a checkpoint of 2 ranks loads onto 1, or into a plain model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

SHARDS = "shards"  # the DCP part of a sharded checkpoint directory


class ShardingError(RuntimeError):
    """The model cannot be sharded as asked (no process group, an unsupported precision)."""


def fsdp_wrapper(device: torch.device, amp_dtype: torch.dtype | None) -> Callable[[nn.Module], nn.Module]:
    """A ``wrap_model`` that shards every ``TransformerBlock``, then the root, over all ranks of the process group.

    The root unit holds the token embedding, the final LayerNorm and the output projection, so the tied
    embedding/output weight stays one parameter in one unit. With bf16 autocast (``amp_dtype``) the parameters are
    all-gathered in bf16 and gradients reduced in fp32 (FSDP2's ``MixedPrecisionPolicy``); the sharded master
    weights and the optimizer stay fp32. fp16 would need a sharded GradScaler, so it is refused.
    """
    if amp_dtype == torch.float16:
        raise ShardingError(
            "fsdp trains in fp32 or bf16 (train.amp=off or bf16); fp16 needs a sharded GradScaler"
        )

    def wrap(model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not _distributed():
            raise ShardingError("fsdp needs an initialized torch.distributed process group (gloo or nccl)")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if amp_dtype == torch.bfloat16
            else MixedPrecisionPolicy()
        )
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if dist.get_backend() == "gloo":
            # pytorch#162338: FSDP2's AVG reduce-scatter over gloo summed instead of averaging in some versions.
            # torch 2.13 averaged correctly when checked here (2 ranks matched one process to 1.9e-7 with and
            # without this), but summing and dividing ourselves is right on every version for one division;
            # tests/unit/test_sharding.py compares the gradients with one process on every upgrade.
            for module in model.modules():
                if hasattr(module, "set_force_sum_reduction_for_comms"):
                    module.set_force_sum_reduction_for_comms(True)
        return model

    return wrap


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensor shards (after :func:`fsdp_wrapper`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: off = keep this micro-batch's gradients local (no reduce-scatter), on = reduce."""
    model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def global_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float: over DTensor gradients it is a replicated DTensor of the norm
    over every shard (the global norm), over plain tensors the norm itself."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU on rank 0 ({} on the others): a collective, every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                rank_state: dict[str, Any]) -> None:  # fmt: skip
    """Every rank: its shard of the model and optimizer (DCP) and its ``rank_state`` into ``directory/shards``.

    A collective. ``directory`` may be the same on every rank (a shared filesystem) or each rank's own (a
    launcher merges them later: the file names never collide).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = Path(directory) / SHARDS
    target.mkdir(parents=True, exist_ok=True)
    # Before dcp.save, whose last step waits for every rank: when it returns on rank 0, all files are written.
    torch.save(rank_state, target / rank_file(rank))
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(target),
                 no_dist=not _distributed())  # fmt: skip


def load_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model and optimizer from ``directory/shards`` into a sharded or plain model of any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to fill: this run's shards
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDS), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_unsharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
) -> None:
    """Load an unsharded (ddp or one-process) checkpoint into a sharded model: every rank reads the full weights
    and AdamW state and keeps its shard of them.

    ``optim_state`` is ``optimizer.state_dict()`` of the same parameter groups over the plain model, which numbers
    parameters in group order; the sharded optimizer's groups list the same parameters in the same order.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in optim_state["param_groups"] for i in group["params"]]
    if len(saved) != len(ordered):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameters, this model {len(ordered)}")
    by_name = {
        "state": {ordered[i]: dict(s) for i, s in optim_state["state"].items()},
        "param_groups": [
            {**g, "params": [ordered[i] for i in g["params"]]} for g in optim_state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True, strict=False)  # the tied output weight is not stored
    # (copies: set_state_dict replaces the full tensors in the dicts it is given by shards)
    set_state_dict(
        model, optimizer, model_state_dict=dict(weights), optim_state_dict=by_name, options=options
    )


def rank_file(rank: int) -> str:
    """File name of one rank's own state in ``shards/``."""
    return f"rank-{rank:05d}.pt"


def read_rank_state(directory: Path, rank: int) -> dict[str, Any] | None:
    """The state ``rank`` saved in a sharded checkpoint, or None when it has none (another world size)."""
    path = Path(directory) / SHARDS / rank_file(rank)
    return torch.load(path, weights_only=True) if path.is_file() else None


def has_shards(directory: Path) -> bool:
    """Whether a checkpoint directory holds a sharded model and optimizer."""
    return (Path(directory) / SHARDS / ".metadata").is_file()


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every save or load without a process group; loading shards into one process is a feature."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
