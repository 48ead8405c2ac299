"""Start the Ray Train worker's process before Ray Train asks for it, with its imports already done.

On a fresh local Ray, ``lm train`` spends seconds between ``trainer.fit()`` and the first step while Ray Train's
controller starts its actors, each a new process, and then the worker imports torch, lm and
``torch._dynamo`` (which every ``torch.optim`` optimizer imports when it is built: 1.3 s on an idle machine, 3.4 s
beside Train's other starting processes). Only the worker's imports are ours to move. So, right after ``ray.init``,
:func:`prestart_train_workers` asks the raylet for ``num_workers`` idle worker processes with exactly the runtime
environment Ray Train will give its workers, and that environment names :func:`warm_up` as the process's set-up
hook: those processes import everything (rank 0 no longer imports MLflow: tracking.MetricRelay) while the controller
starts. When Train then creates its worker actors, Ray hands them these processes, because their runtime
environment matches. On 2 cores, ``lm train experiments/tiny.yaml train.max_seconds=3`` reached its first step
about 4 s sooner: 13.2-14.7 s instead of 18.5-18.6 s (``LMLAB_PREWARM=0``, alternating runs in one hour, counted
from after the imports, as the command printed it then; ``python -m bench.startup`` measures it now).

Only for a Ray this process started (one machine, ours), whose job has no runtime environment of its own (``uv
run`` gives it one, and Train's would then differ from ours); a cluster we join is left alone. Everything here
leans on Ray internals (the raylet's PrestartWorkers RPC, the set-up hook's environment variable, how Train and the
core worker spell a runtime environment), checked against Ray 2.60: on another Ray release, or where any piece is
missing, :func:`prestart_train_workers` returns False and Train starts its workers as it did before. If only the
spelling changes, the prestarted processes go unused until their keep-alive ends, and each Train worker still
runs :func:`warm_up` when it starts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("lmplatform.prewarm")

HOOK = f"{__name__}.warm_up"
SWITCH_ENV = "LMLAB_PREWARM"  # "0": start Train's workers the usual way (for comparisons)
KEEP_ALIVE_S = 120  # a prestarted process Ray never hands out is idle-killed after this
TESTED_RAY = "2.60."  # the Ray release whose internals prewarm and lean were checked against

_prestarted: dict[str, Any] = {}  # the Ray (session, job) this process prestarted in, and the runtime env
warmed = False  # set by warm_up in the process it ran in


def warm_up() -> None:
    """Ray runs this in a prestarted process before it takes work: the Train worker's imports.

    Never raises (a hook that fails would make Ray kill the process); whatever fails here fails again, with its
    real error, when the training function imports it.
    """
    global warmed
    try:
        import ray.train.torch  # noqa: F401  (Train's torch backend: the process group set-up)
        import torch._dynamo  # noqa: F401  (torch.optim imports it when the first optimizer is built)

        import lmplatform.train  # noqa: F401  (torch, lm and the training function's module)

        warmed = True
    except Exception as exc:  # noqa: BLE001
        log.debug("warm-up failed (the worker imports these itself): %s", exc)


def take_worker_runtime_env() -> dict[str, Any] | None:
    """The ``worker_runtime_env`` for the Train run that follows :func:`prestart_train_workers` on the same Ray:
    the one its processes were prestarted with (once; a later run on that Ray gets None)."""
    import ray

    prestarted = dict(_prestarted)
    _prestarted.clear()
    if not prestarted or not ray.is_initialized() or ray_identity() != prestarted["ray"]:
        return None
    return prestarted["runtime_env"]


def prestart_train_workers(num_workers: int) -> bool:
    """Ask this node's raylet for ``num_workers`` idle processes that Ray Train's worker actors will be given.

    True when the raylet took the request; False (and a debug line) when switched off, on a Ray release this was
    not checked against, with a job runtime environment, or when this Ray lacks any piece used here.
    """
    _prestarted.clear()
    if num_workers <= 0 or os.environ.get(SWITCH_ENV) == "0":
        return False
    try:
        import ray

        if not ray.is_initialized():  # (Ray's runtime context would start one)
            raise RuntimeError("this process has no Ray")
        if not ray.__version__.startswith(TESTED_RAY):
            raise RuntimeError(f"checked against Ray {TESTED_RAY}x, this is {ray.__version__}")
        from ray.train.v2._internal.constants import is_v2_enabled

        if not is_v2_enabled():
            raise RuntimeError("Ray Train V1 has no worker_runtime_env, and its workers start another way")
        if ray.get_runtime_context().get_runtime_env_string() not in ("", "{}"):
            raise RuntimeError("the job has a runtime environment: Train's workers inherit it, ours lack it")
        runtime_env = {"env_vars": _own_env_vars()}
        _request(num_workers, _train_worker_runtime_env(runtime_env["env_vars"]))
    except Exception as exc:  # noqa: BLE001  (an internal moved: train as before)
        log.debug("not prestarting Ray Train's workers: %s", exc)
        return False
    _prestarted.update(ray=ray_identity(), runtime_env=runtime_env)
    return True


def _own_env_vars() -> dict[str, str]:
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    from ray.runtime_env import RuntimeEnv

    own = {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK}
    RuntimeEnv(env_vars=own)  # Ray's own validation, before any process gets it
    return own


def _train_worker_runtime_env(own: dict[str, str]) -> str:
    """The runtime environment of Train's worker actors, serialized as Ray hashes it.

    The controller's environment is what Train propagates from this process plus its asyncio-warning default;
    the controller creates the workers with ``worker_runtime_env`` (``own``) over what it propagates in turn, and
    its core worker merges that child over the parent and writes compact JSON with sorted keys.
    """
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        get_env_vars_to_propagate,
    )

    controller = get_env_vars_to_propagate()
    controller.setdefault(
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )
    merged = {"env_vars": {**controller, **own}}
    return json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _request(num_workers: int, serialized_runtime_env: str) -> None:
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

    node = ray._private.worker.global_worker.node
    channel = init_grpc_channel(f"{node.node_ip_address}:{node.node_manager_port}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.Language.PYTHON,
                job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
                runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=serialized_runtime_env),
                keep_alive_duration_secs=KEEP_ALIVE_S,
                num_workers=num_workers,
            ),
            timeout=2,  # the raylet answers at once and starts the processes afterwards
        )
    finally:
        channel.close()


def ray_identity() -> tuple[str, str]:
    """This process's Ray: job ids restart at 01000000 on every new cluster, session names do not."""
    import ray

    return ray._private.worker.global_worker.node.session_name, ray.get_runtime_context().get_job_id()
