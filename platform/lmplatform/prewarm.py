"""Start the Ray Train worker's process before Ray Train asks for it, with its imports already done.

On a fresh local Ray, ``lm train`` spends seconds between ``trainer.fit()`` and the first step while Ray Train's
controller starts its actors, each a new process, and then the worker imports torch, lm, MLflow and
``torch._dynamo`` (which every ``torch.optim`` optimizer imports when it is built: 1.3 s on its own). Only the
worker's imports are ours to move. So, right after ``ray.init``, :func:`prestart_train_workers` asks the raylet for
``num_workers`` idle worker processes with exactly the runtime environment Ray Train will give its workers, and
that environment names :func:`warm_up` as the process's set-up hook: those processes import everything and open
the MLflow store while the controller starts. When Train then creates its worker actors, Ray hands them these
processes, because their runtime environment matches. On 2 cores this brought ``make train``'s first step from
17.7-18.6 s to 14.0-14.8 s after the command (alternating runs, same hour).

Only for a Ray this process started (one machine, ours); a cluster we join is left alone. Everything here leans on
Ray internals (the raylet's PrestartWorkers RPC, the set-up hook's environment variable, how Train and the core
worker spell a runtime environment); where any of it moves in a Ray release, :func:`prestart_train_workers`
returns False and Train starts its workers as it did before. If only the spelling changes, the prestarted
processes go unused until their keep-alive ends, and each Train worker still runs :func:`warm_up` when it starts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("lmplatform.prewarm")

HOOK = f"{__name__}.warm_up"
TRACKING_ENV = "LMLAB_PREWARM_TRACKING_URI"  # the store warm_up opens, so rank 0's first log finds it open
SWITCH_ENV = "LMLAB_PREWARM"  # "0": start Train's workers the usual way (for comparisons)
KEEP_ALIVE_S = 120  # a prestarted process Ray never hands out is idle-killed after this

_prestarted: dict[str, Any] = {}  # {"job": job id, "runtime_env": ...} for the Ray this process prestarted in
warmed = False  # set by warm_up in the process it ran in


def warm_up() -> None:
    """Ray runs this in a prestarted process before it takes work: the Train worker's imports, and the MLflow store.

    Never raises (a hook that fails would make Ray kill the process); whatever fails here fails again, with its
    real error, when the training function imports it.
    """
    global warmed
    try:
        import ray.train.torch  # noqa: F401  (Train's torch backend: the process group set-up)
        import torch._dynamo  # noqa: F401  (torch.optim imports it when the first optimizer is built)

        import lmplatform.train  # noqa: F401  (torch, lm and the training function's module)

        uri = os.environ.get(TRACKING_ENV)
        if uri:
            from lmplatform.tracking import mlflow_client

            _ = mlflow_client(
                uri
            )._tracking_client.store  # MLflow caches the store per URI: the logger reuses it
        warmed = True
    except Exception as exc:  # noqa: BLE001
        log.debug("warm-up failed (the worker imports these itself): %s", exc)


def worker_runtime_env() -> dict[str, Any] | None:
    """The ``worker_runtime_env`` for Train's RunConfig: the one the processes were prestarted with, on the same
    Ray; None when nothing was prestarted."""
    import ray

    if (
        not _prestarted
        or not ray.is_initialized()
        or ray.get_runtime_context().get_job_id() != _prestarted["job"]
    ):
        return None
    return json.loads(json.dumps(_prestarted["runtime_env"]))  # a copy


def prestart_train_workers(num_workers: int, tracking_uri: str | None) -> bool:
    """Ask this node's raylet for ``num_workers`` idle processes that Ray Train's worker actors will be given.

    True when the raylet took the request; False (and a debug line) when this Ray lacks any piece used here.
    """
    _prestarted.clear()
    if num_workers <= 0 or os.environ.get(SWITCH_ENV) == "0":
        return False
    try:
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
        from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
            get_env_vars_to_propagate,
        )

        own = {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK}
        if tracking_uri:
            own[TRACKING_ENV] = tracking_uri
        runtime_env = {"env_vars": own}
        # The runtime environment Train's worker actors get, as Ray hashes it: the controller's environment
        # (what Train propagates from this process, plus its asyncio-warning default) with ours merged in, written
        # by the controller's core worker as compact JSON with sorted keys.
        controller = get_env_vars_to_propagate()
        controller.setdefault(
            RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
        )
        merged = {"env_vars": {**controller, **own}}
        serialized = json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

        node = ray._private.worker.global_worker.node
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(
            init_grpc_channel(f"{node.node_ip_address}:{node.node_manager_port}")
        )
        job = ray.get_runtime_context().get_job_id()
        stub.PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.Language.PYTHON,
                job_id=bytes.fromhex(job),
                runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=serialized),
                keep_alive_duration_secs=KEEP_ALIVE_S,
                num_workers=num_workers,
            ),
            timeout=10,
        )
    except Exception as exc:  # noqa: BLE001  (an internal moved: train as before)
        log.debug("not prestarting Ray Train's workers: %s", exc)
        return False
    _prestarted.update(job=job, runtime_env=runtime_env)
    return True
