"""Ray Train without the parts an lm run never uses: fewer processes and threads beside the training worker.

On 2 cores every Ray process costs the training worker steps, whether or not it does anything: each Ray actor
wakes 100 times a second (a 10-ms timer in Ray's core worker that checks for signals), and each wake-up takes a
core from one of the worker's two compute threads, whose partner then waits for it. In a `make train` run the
worker's compute threads were taken off their cores about 1,000 times a second, against about 50 in-process.
Ray Train 2.60 gives one worker a controller and four more actors. Three things lm never uses go:

- the dataset manager (Train's ``DatasetsCallback``): an actor, and ray.data's imports in a new process, for Ray
  Data datasets. lm passes none; its own sampler reads the token blocks.
- the placement-group cleaner (``PlacementGroupCleanerCallback``): an actor that asks Ray's state API every
  second whether the controller still lives, to free the run's resources if the controller dies while the
  driver lives on. Left out only for a single run on a Ray that ``ensure_ray`` started for it (``lm train``, whose
  Ray ends with its process; a Python caller of ``run_training`` on such a Ray would have to start the next run
  on a fresh one, or ``ray.shutdown()`` first, if a controller ever died). Sweeps and clusters keep it (a
  trial's controller can die while the sweep goes on).
- the torch process group of a single DDP worker: gloo's thread, which also wakes 100 times a second, and four
  rounds of remote calls to set it up, for a group of one. FSDP keeps it, since its device mesh needs one. The
  worker then also lacks the variables Train sets for torch.distributed (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``...), which lm does not read.

These lean on Ray internals checked against Ray 2.60 (``_create_default_callbacks``, the two callback classes,
``_TorchBackend``). Where any of them is missing, Train runs with all its parts, as it comes.
``LMLAB_LEAN=0`` keeps them all (for comparisons).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("lmplatform.lean")

SWITCH_ENV = "LMLAB_LEAN"  # "0": Ray Train with all its default parts (for comparisons)

_own_cluster: dict[str, Any] = {}  # the Ray (session, job) that one `lm train` run started for itself


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV) != "0"


def claim_cluster(owned: bool) -> None:
    """Record whether the Ray this process just connected to was started by it for a single run (it ends with
    this process); the next :func:`take_own_cluster` on that Ray says so, once."""
    from lmplatform.prewarm import ray_identity

    _own_cluster.clear()
    if owned:
        try:
            _own_cluster["ray"] = ray_identity()
        except Exception as exc:  # noqa: BLE001  (a Ray internal moved: keep the cleaner)
            log.debug("keeping Train's placement-group cleaner: %s", exc)


def take_own_cluster() -> bool:
    """True, once, for the run that follows ``claim_cluster(True)`` on the same Ray."""
    import ray

    from lmplatform.prewarm import ray_identity

    claimed = _own_cluster.pop("ray", None)
    return claimed is not None and ray.is_initialized() and ray_identity() == claimed


def trainer_class(own_cluster: bool) -> type:
    """``TorchTrainer``, or a subclass without the callbacks lm does not use (``own_cluster``: this driver's Ray
    ends with the run, so the placement-group cleaner goes too)."""
    from ray.train.torch import TorchTrainer

    if not enabled():
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError as exc:
        log.debug("Ray Train with all its parts: %s", exc)
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        log.debug("Ray Train with all its parts: TorchTrainer has no _create_default_callbacks")
        return TorchTrainer
    unused: tuple[type, ...] = (DatasetsCallback,)
    if own_cluster:
        unused += (PlacementGroupCleanerCallback,)

    class LeanTorchTrainer(TorchTrainer):
        """TorchTrainer without the dataset manager (no datasets given) and, on lm's own Ray, the cleaner."""

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:  # somebody gave it datasets: it needs their manager
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, unused)]

    return LeanTorchTrainer


def torch_config(strategy: str, num_workers: int) -> Any:
    """Train's TorchConfig; for a single DDP worker, one whose backend sets up no process group."""
    from ray.train.torch import TorchConfig

    if not enabled() or strategy != "ddp" or num_workers != 1:
        return TorchConfig()
    try:
        from ray.train.torch.config import _TorchBackend
    except ImportError as exc:
        log.debug("a process group for the single worker: %s", exc)
        return TorchConfig()

    class SingleWorkerBackend(_TorchBackend):
        """Sets up a process group only for a group of more than one (a resized group gets one again)."""

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            if len(worker_group) > 1:
                super().on_start(worker_group, backend_config)

    class SingleWorkerTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return SingleWorkerBackend

    return SingleWorkerTorchConfig()
