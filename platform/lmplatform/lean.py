"""Ray Train without the parts an lm run never uses: fewer processes and threads beside the training worker.

On 2 cores every Ray process costs the training worker steps, whether or not it does anything: each Ray actor
wakes 100 times a second (a 10-ms timer in Ray's core worker that checks for signals), and each wake-up takes a
core from one of the worker's two compute threads, whose partner then waits for it. In a `make train` run the
worker's compute threads were taken off their cores about 1,000 times a second, against about 50 in-process.
Ray Train 2.60 gives one worker a controller and four more actors. Four things lm never uses go:

- the dataset manager (Train's ``DatasetsCallback``): an actor, and ray.data's imports in a new process, for Ray
  Data datasets. lm passes none; its own sampler reads the token blocks.
- the placement-group cleaner (``PlacementGroupCleanerCallback``): an actor that asks Ray's state API every
  second whether the controller still lives, to free the run's resources if the controller dies while the
  driver lives on. Left out only for a single run on a Ray that ``ensure_ray`` started for it (``lm train``, whose
  Ray ends with its process; a Python caller of ``run_training`` on such a Ray would have to start the next run
  on a fresh one, or ``ray.shutdown()`` first, if a controller ever died). Sweeps and clusters keep it (a
  trial's controller can die while the sweep goes on).
- the autoscaling coordinator (:func:`without_coordinator`), a detached actor in a process of its own that Train's
  fixed scaling policy asks for its workers' resources when the controller starts, and every 20 s after, so that an
  autoscaling cluster grows to hold them. Left out only on a Ray that ``ensure_ray`` started for a single run: it
  cannot grow. Without it the first step of ``lm train experiments/tiny.yaml`` came about 1 s sooner (10.7-11.2 s
  against 11.6-12.3 s, 4 alternating pairs).
- the torch process group of a single DDP worker: gloo's thread, which also wakes 100 times a second, and four
  rounds of remote calls to set it up, for a group of one. FSDP keeps it, since its device mesh needs one. The
  worker then also lacks the variables Train sets for torch.distributed (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``...), which lm does not read. Its backend config is not a ``TorchConfig``, whose
  module imports torch: Train's controller unpickles it, and with ``build_trainer`` passing the loop's config as
  an object reference, the controller starts without importing torch or lm (2-3 s less of its start, which
  Train's worker waited for).

A Ray that ``ensure_ray`` starts on this machine also goes without processes ``ray.init`` always starts
(:func:`bare_head`): Ray's API server (with ``include_dashboard=False`` it serves only usage statistics, and
``ray.init`` waits 1.5-2 s for it to publish its address), the autoscaler's monitor (a fixed local cluster has
nothing to scale) and the idle workers the raylet prestarts for the first driver, one per CPU (one became Train's
autoscaling coordinator; the other idled, waking 100 times a second, through the whole run; Train's worker now
gets the process ``prewarm`` asks for).

These lean on Ray internals checked against Ray 2.60 (``_create_default_callbacks``, the two callback classes,
``_initialize_and_run_controller``, ``FixedScalingPolicy``, ``_TorchBackend``,
``Node.start_api_server``/``start_monitor``, the ``prestart_worker_first_driver`` setting).
Where any of them is missing, Ray and Train run with all their parts, as they come. ``LMLAB_LEAN=0`` keeps them
all (for comparisons).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("lmplatform.lean")

SWITCH_ENV = "LMLAB_LEAN"  # "0": Ray Train with all its default parts (for comparisons)
_HEAD_EXTRAS = ("start_api_server", "start_monitor")  # the ray._private.node.Node methods bare_head skips

_own_cluster: dict[str, Any] = {}  # the Ray (session, job) that one `lm train` run started for itself


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV) != "0"


@contextlib.contextmanager
def bare_head() -> Iterator[dict[str, Any]]:
    """Around the ``ray.init`` that starts a local Ray: yields the extra ``ray.init`` options, and while it lasts
    the head starts without its API server and autoscaler monitor (one process fewer each, and ``ray.init``
    returns without waiting for the API server). Yields ``{}`` and changes nothing where switched off or where
    this Ray is not the one this was checked against."""
    import ray

    from lmplatform.prewarm import TESTED_RAY

    originals: dict[str, Any] = {}
    try:
        from ray._private.node import Node

        if not enabled():
            raise RuntimeError(f"{SWITCH_ENV}=0")
        if not ray.__version__.startswith(TESTED_RAY):
            raise RuntimeError(f"checked against Ray {TESTED_RAY}x, this is {ray.__version__}")
        originals = {name: Node.__dict__[name] for name in _HEAD_EXTRAS}
    except (ImportError, KeyError, RuntimeError) as exc:
        log.debug("a local Ray with all its processes: %s", exc)
    if not originals:  # (outside the except: an error in ray.init is not "during handling" of this one)
        yield {}
        return

    def skip(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    for name in _HEAD_EXTRAS:
        setattr(Node, name, skip)
    try:
        yield {"_system_config": {"prestart_worker_first_driver": False}}
    finally:
        for name, original in originals.items():
            setattr(Node, name, original)


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
        """TorchTrainer without the dataset manager (no datasets given) and, on lm's own Ray, the cleaner and the
        autoscaling coordinator."""

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:  # somebody gave it datasets: it needs their manager
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            if own_cluster and not self.datasets:
                policy = controller_init_kwargs.get("scaling_policy")
                controller_init_kwargs["scaling_policy"] = without_coordinator(policy)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LeanTorchTrainer


def without_coordinator(policy: Any) -> Any:
    """Train's fixed scaling policy, without its autoscaling coordinator; any other policy as it is.

    The fixed policy asks the coordinator (a detached actor, ray.data's imports in a process of its own) for its
    workers' resources when the controller starts, and again every 20 s, so that an autoscaling cluster grows to
    hold them. A Ray that ``lm train`` started on this machine for one run cannot grow: the requests change
    nothing, and the actor costs a process on the way to the first step and one more set of wake-ups through the
    run. (ray.data's own autoscaling asks the same actor; lm gives Train no datasets.)
    """
    try:
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    except ImportError as exc:
        log.debug("keeping the autoscaling coordinator: %s", exc)
        return policy
    if type(policy) is not FixedScalingPolicy:  # elastic (it decides from the coordinator's answers) or new
        return policy
    needed = ("_maybe_send_resource_request", "after_controller_start", "before_controller_shutdown",
              "before_controller_abort")  # fmt: skip
    if not all(callable(getattr(FixedScalingPolicy, name, None)) for name in needed):
        log.debug("keeping the autoscaling coordinator: FixedScalingPolicy changed")
        return policy

    # Defined here, so it travels by value to the controller.
    class FixedScalingPolicyOnOwnCluster(FixedScalingPolicy):
        """Asks nobody for resources: the cluster is what it is."""

        def _maybe_send_resource_request(self) -> None:
            pass

        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        async def before_controller_shutdown(self) -> None:
            pass

        def before_controller_abort(self) -> None:
            pass

    return FixedScalingPolicyOnOwnCluster(policy.scaling_config)


def torch_config(strategy: str, num_workers: int) -> Any:
    """Train's TorchConfig; for a single DDP worker, a backend config that sets up no process group and that
    Train's controller unpickles without importing torch (TorchConfig's module imports it: 1.5-2 s of the
    controller's start, on the way to the first step)."""
    from ray.train.torch import TorchConfig

    if not enabled() or strategy != "ddp" or num_workers != 1:
        return TorchConfig()
    try:
        from ray.train import backend as train_backend
        from ray.train.torch import config as torch_backend
        from ray.train.v2._internal import util as train_util
    except ImportError as exc:
        log.debug("a process group for the single worker: %s", exc)
        return TorchConfig()
    needed = {train_backend: ("Backend", "BackendConfig"), torch_backend: ("_TorchBackend", "TorchConfigContextManager"),
              train_util: ("TrainingFramework",)}  # fmt: skip
    missing = [f"{module.__name__}.{name}" for module, names in needed.items() for name in names
               if not hasattr(module, name)]  # fmt: skip
    if missing:
        log.debug("a process group for the single worker: this Ray has no %s", ", ".join(missing))
        return TorchConfig()
    # Defined here, so they travel by value to the controller; anything of torch's is imported inside the
    # methods, where they run (the worker imports torch anyway).

    class SingleWorkerBackend(train_backend.Backend):
        """Sets up a process group only for a group of more than one (a resized group gets Train's own)."""

        share_cuda_visible_devices = True  # as TorchConfig's backend

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            if len(worker_group) > 1:
                from ray.train.torch.config import TorchConfig, _TorchBackend

                _TorchBackend().on_start(worker_group, TorchConfig(backend=backend_config.backend))

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            # a group of one has no process group to destroy, and its actor ends right after (Train's cleanup
            # would also empty the CUDA cache, and import torch in the controller before fit() returns)
            if len(worker_group) > 1:
                from ray.train.torch.config import TorchConfig, _TorchBackend

                _TorchBackend().on_shutdown(worker_group, TorchConfig())

    class SingleWorkerTorchConfig(train_backend.BackendConfig):
        backend: str | None = None  # TorchTrainer names it ("gloo", "nccl"), as for its own TorchConfig

        @property
        def backend_cls(self) -> type:
            return SingleWorkerBackend

        @property
        def train_func_context(self) -> type:  # read in the driver; the class runs in the worker
            from ray.train.torch.config import TorchConfigContextManager

            return TorchConfigContextManager

        @property
        def framework(self) -> Any:
            from ray.train.v2._internal.util import TrainingFramework

            return TrainingFramework.TORCH

    return SingleWorkerTorchConfig()
