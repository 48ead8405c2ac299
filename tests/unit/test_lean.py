"""lmplatform/lean.py without a Ray: which of Ray Train's parts an lm run leaves out, and where it keeps them. (On a
Ray that `lm train` starts, tests/integration/test_cli.py's signal test checks the processes themselves: no dataset
manager, no placement-group cleaner, no autoscaling coordinator, no gloo thread in a single rank, no torch in its
controller, no API server, autoscaler monitor or idle worker.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
from lmplatform import lean
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback


@pytest.fixture(autouse=True)
def _lean_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lean.SWITCH_ENV, raising=False)  # a user's LMLAB_LEAN=0 must not decide these tests


def _noop(config: dict) -> None:
    return None


def _callback_types(trainer_class: type, **kwargs: object) -> set[type]:
    trainer = trainer_class(_noop, train_loop_config={}, **kwargs)
    return {type(callback) for callback in trainer._create_default_callbacks()}


def test_a_run_on_its_own_ray_has_neither_dataset_manager_nor_cleaner() -> None:
    types = _callback_types(lean.trainer_class(own_cluster=True))
    assert not types & {DatasetsCallback, PlacementGroupCleanerCallback}
    assert types  # the rest (backend set-up, accelerators, the user callbacks' handler) stays


def test_a_sweep_or_a_joined_cluster_keeps_the_cleaner() -> None:
    # a trial's controller can die while the sweep's driver lives on: the cleaner frees its resources
    types = _callback_types(lean.trainer_class(own_cluster=False))
    assert PlacementGroupCleanerCallback in types
    assert DatasetsCallback not in types


def test_given_datasets_the_trainer_keeps_their_manager() -> None:
    types = _callback_types(lean.trainer_class(own_cluster=True), datasets={"train": [1, 2, 3]})
    assert DatasetsCallback in types


def test_lmlab_lean_0_gives_ray_train_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lean.SWITCH_ENV, "0")
    assert lean.trainer_class(own_cluster=True) is TorchTrainer
    assert type(lean.torch_config("ddp", 1)) is TorchConfig
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= _callback_types(TorchTrainer)


def _policy_sent(trainer_class: type, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> object:
    """The scaling policy a trainer of ``trainer_class`` hands Train's controller (caught before any actor starts)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    sent: dict[str, object] = {}
    monkeypatch.setattr(
        DataParallelTrainer, "_initialize_and_run_controller", lambda self, **kw: sent.update(kw)
    )
    scaling = ScalingConfig(num_workers=1)
    trainer = trainer_class(_noop, train_loop_config={}, scaling_config=scaling, **kwargs)
    trainer._initialize_and_run_controller(scaling_policy=create_scaling_policy(scaling))
    return sent["scaling_policy"]


def test_a_run_on_its_own_ray_asks_no_autoscaling_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    policy = _policy_sent(lean.trainer_class(own_cluster=True), monkeypatch)
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    # Train's own asks the coordinator first (its client is made in after_controller_start): it fails here
    with pytest.raises(AssertionError):
        FixedScalingPolicy(policy.scaling_config).make_decision_for_non_running_worker_group()
    decision = policy.make_decision_for_non_running_worker_group()  # the same decision, asking nobody
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 1
    assert policy.after_controller_start(None) is None and policy.before_controller_abort() is None
    # a sweep's trial or a joined cluster (which may grow) keeps Train's policy, as does a trainer given datasets
    assert type(_policy_sent(lean.trainer_class(own_cluster=False), monkeypatch)) is FixedScalingPolicy
    given = _policy_sent(lean.trainer_class(own_cluster=True), monkeypatch, datasets={"train": [1]})
    assert type(given) is FixedScalingPolicy


class _Group:
    """A stand-in for Train's worker group: on_start only asks its length before anything else."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked: list[str] = []

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name: str) -> object:
        self.asked.append(name)
        raise RuntimeError(f"{name}: the process group set-up started")


def test_only_a_single_ddp_worker_goes_without_a_process_group() -> None:
    config = lean.torch_config("ddp", 1)
    assert config.backend_cls is not TorchConfig().backend_cls
    # the worker still sets its CUDA device
    assert config.train_func_context is TorchConfig().train_func_context
    assert config.framework == TorchConfig().framework and config.backend_cls.share_cuda_visible_devices
    group = _Group(1)
    config.backend_cls().on_start(group, config)  # nothing to set up for a group of one
    assert group.asked == []
    resized = _Group(2)  # a group that grows gets its process group
    with pytest.raises(RuntimeError, match="process group set-up started"):
        config.backend_cls().on_start(resized, config)
    assert resized.asked
    # two DDP workers, and FSDP even on one (its device mesh needs the group), keep Train's own backend
    assert type(lean.torch_config("ddp", 2)) is TorchConfig
    assert type(lean.torch_config("fsdp", 1)) is TorchConfig


_UNPICKLE = """
import sys
from ray import cloudpickle
cloudpickle.loads(sys.stdin.buffer.read())
print(" ".join(m for m in ("torch", "lm", "lmplatform.train") if m in sys.modules))
"""


def _imports_to_unpickle(config: object) -> str:
    """What a new process (as Train's controller) imports to unpickle what TorchTrainer sends its controller."""
    from ray import cloudpickle

    trainer = lean.trainer_class(own_cluster=True)(_noop, train_loop_config={"ref": "x"}, torch_config=config)
    sent = cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks()))
    done = subprocess.run([sys.executable, "-c", _UNPICKLE], input=sent, capture_output=True, check=True)
    return done.stdout.decode().strip()


def test_trains_controller_unpickles_a_single_workers_configs_without_torch() -> None:
    assert _imports_to_unpickle(lean.torch_config("ddp", 1)) == ""
    assert _imports_to_unpickle(TorchConfig()) == "torch"  # what it was, and what two workers still get


def test_bare_head_leaves_out_the_api_server_and_monitor_only_while_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._private.node import Node

    originals = {name: getattr(Node, name) for name in lean._HEAD_EXTRAS}
    with pytest.raises(KeyError), lean.bare_head() as extra:
        assert extra == {"_system_config": {"prestart_worker_first_driver": False}}
        assert all(getattr(Node, name) is not original for name, original in originals.items())
        raise KeyError("ray.init failed")  # the methods come back even then
    assert {name: getattr(Node, name) for name in originals} == originals
    monkeypatch.setenv(lean.SWITCH_ENV, "0")
    with lean.bare_head() as extra:
        assert extra == {} and {name: getattr(Node, name) for name in originals} == originals
