"""lmplatform/tune.py search spaces: YAML -> ray.tune samplers, model.params, and every bad space refused early."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmplatform.sizes import count_params
from lmplatform.tune import check_space, load_sweep, parse_space, search_space, trial_config
from ray.tune.search.sample import Categorical, Float, Integer

from lm.config import ConfigError

BASE = {"name": "t", "optim": {"min_lr": 0.0}}


def _space(search: dict) -> dict:
    return search_space(parse_space(search))


def test_each_kind_becomes_the_matching_ray_tune_sampler() -> None:
    space = _space({
        "optim.lr": {"loguniform": [1.0e-3, "1e-2"]},  # PyYAML reads 1e-2 (no dot) as a string
        "optim.beta1": {"uniform": [0.8, 0.95]},
        "model.n_layer": {"randint": [1, 5]},
        "model.n_head": {"choice": [2, 4]},
        "optim.schedule": {"grid": ["cosine", "wsd"]},
    })  # fmt: skip
    lr, beta1, n_layer, n_head = (
        space["optim.lr"],
        space["optim.beta1"],
        space["model.n_layer"],
        space["model.n_head"],
    )
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-3, 1e-2)
    assert type(lr.get_sampler()).__name__ == "_LogUniform"
    assert isinstance(beta1, Float) and (beta1.lower, beta1.upper) == (0.8, 0.95)
    assert type(beta1.get_sampler()).__name__ == "_Uniform"
    assert isinstance(n_layer, Integer) and (n_layer.lower, n_layer.upper) == (1, 5)  # hi exclusive, as ray's
    assert isinstance(n_head, Categorical) and n_head.categories == [2, 4]
    assert space["optim.schedule"] == {"grid_search": ["cosine", "wsd"]}
    assert _space({"optim.lr": {"grid": ["3e-3", "5.0e-3", "1e3x"]}})["optim.lr"] == {
        "grid_search": [3e-3, 5e-3, "1e3x"]
    }
    assert list(space) == ["optim.lr", "optim.beta1", "model.n_layer", "model.n_head", "optim.schedule"]


def test_nested_yaml_and_dotted_overrides_mean_the_same_key() -> None:
    nested = parse_space({"optim": {"lr": {"grid": [1e-3, 2e-3]}}, "model.n_layer": {"choice": [1, 2]}})
    assert [(d.key, d.kind, d.values) for d in nested] == [
        ("optim.lr", "grid", (1e-3, 2e-3)), ("model.n_layer", "choice", (1, 2)),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"search\.optim\.lr: unknown kind 'grdi'"):
        parse_space({"optim": {"lr": {"grdi": [1e-3]}}})


def test_describe_and_candidates() -> None:
    lr, n_layer = parse_space(
        {"optim.lr": {"loguniform": [1e-3, 1e-2]}, "model.n_layer": {"randint": [1, 5]}}
    )
    assert lr.describe() == "loguniform [0.001, 0.01]"
    assert lr.candidates() == pytest.approx((1e-3, 1e-2, 10**-2.5))  # bounds and the (log) middle
    assert n_layer.candidates() == (1, 4)  # randint's hi is never drawn


def test_model_params_is_applied_after_the_other_keys(tmp_path: Path) -> None:
    cfg = trial_config(BASE, {"model.params": 300_000, "model.n_layer": 4, "optim.lr": 0.01}, tmp_path)
    assert cfg.model.n_layer == 4 and cfg.optim.lr == 0.01
    assert abs(count_params(cfg.model) - 300_000) / 300_000 <= 0.02
    assert cfg.model.n_embd % cfg.model.n_head == 0
    # the same target with 2 layers is another shape with the same count
    two = trial_config(BASE, {"model.params": 300_000, "model.n_layer": 2}, tmp_path)
    assert two.model.n_embd > cfg.model.n_embd and abs(count_params(two.model) - 300_000) <= 6_000
    check_space(BASE, parse_space({"model.params": {"grid": [300_000, 1_000_000]}, "model.n_layer": {"grid": [2, 4]}}),
                tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"model.n_layr": {"grid": [1, 2]}}, r"search\.model\.n_layr=1 is rejected: unknown key 'model\.n_layr'"),
        ({"modle.n_layer": {"choice": [1]}}, r"search\.modle\.n_layer=1 is rejected: unknown key 'modle'"),
        ({"optim.schedule": {"grid": ["cosine", "bogus"]}}, r"search\.optim\.schedule='bogus' is rejected"),
        ({"model.n_layer": {"grid": []}}, r"search\.model\.n_layer\.grid=\[\] is not allowed: a non-empty list"),
        ({"model.n_layer": {"choice": "2"}}, r"search\.model\.n_layer\.choice='2' is not allowed"),
        ({"optim.lr": {"uniform": [0.01, 0.001]}}, r"search\.optim\.lr\.uniform=.* lo must be < hi"),
        ({"optim.lr": {"loguniform": [0, 0.01]}}, r"search\.optim\.lr\.loguniform=.* bounds must be > 0"),
        ({"optim.lr": {"uniform": [0.001]}}, r"search\.optim\.lr\.uniform=.* two bounds"),
        ({"optim.lr": {"uniform": ["a", 1]}}, r"search\.optim\.lr\.uniform: bound 'a' is not a number"),
        ({"model.n_layer": {"randint": [1, 2.5]}}, r"search\.model\.n_layer\.randint: bound 2\.5 is not an integer"),
        ({"optim.lr": {"normal": [0, 1]}}, r"search\.optim\.lr: unknown kind 'normal' \(allowed: choice, grid"),
        ({"optim.lr": {"grid": [1e-3], "choice": [1]}}, r"search\.optim\.lr=.* one \{kind: args\}"),
        ({"optim.lr": 0.01}, r"search\.optim\.lr=0\.01 is not allowed"),
        ({"model.dropout": {"uniform": [0.0, 1.0]}}, r"search\.model\.dropout=1\.0 is rejected: model\.dropout"),
        ({"model.n_layer": {"uniform": [1, 4]}}, r"search\.model\.n_layer=2\.5 is rejected: .*not an integer"),
        ({"optim.lr": {"loguniform": [1e-8, 1e-3]}}, r"search\.optim\.lr=1e-08 is rejected: optim\.min_lr"),
        ({"ray.num_workers": {"grid": [0, 1]}}, r"search\.ray\.num_workers: only experiment keys"),
        ({"model.params": {"grid": [10, 300_000]}}, r"search\.model\.params=10 is rejected: model\.params=10"),
        ({"optim.lr": {"grid": [1e-4, 1e-2]}, "optim.min_lr": {"grid": [0.0, 1e-3]}},
         r"search\.optim\.lr=0\.0001, search\.optim\.min_lr=0\.001 together is rejected"),
    ],
)  # fmt: skip
def test_a_bad_space_raises_config_error_naming_the_key(search: dict, message: str, tmp_path: Path) -> None:
    base = {"name": "t", "optim": {"min_lr": 0.0}} if "optim.min_lr" in search else {"name": "t"}
    with pytest.raises(ConfigError, match=message):
        check_space(base, parse_space(search), tmp_path)


@pytest.mark.parametrize("search", [None, {}, [1, 2], "optim.lr"])
def test_an_empty_or_malformed_search_section_is_refused(search: object) -> None:
    with pytest.raises(ConfigError, match=r"search"):
        parse_space(search)


def test_load_sweep_reads_the_yaml_and_checks_everything_before_starting(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "name: base\noptim: {min_lr: 0.0}\ntrain: {max_steps: 100, seed: 7}\n"
    )
    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(
        "extends: base.yaml\n"
        "search:\n  optim.lr: {loguniform: [1.0e-3, 1.0e-2]}\n  model.params: {grid: [300000, 600000]}\n"
        "tune: {num_samples: 3, scheduler: fifo}\n"
        "ray: {num_workers: 0, storage_path: runs}\n"
    )
    sweep = load_sweep(sweep_yaml, ["tune.max_failures=2"], tmp_path)
    assert sweep.name == "base-sweep" and sweep.path == str(tmp_path / "runs" / "base-sweep")
    assert sweep.keys == ["optim.lr", "model.params"]
    assert sweep.pcfg.tune.num_samples == 3 and sweep.pcfg.tune.max_failures == 2
    assert "search" not in sweep.base and "tune" not in sweep.base and "ray" not in sweep.base
    cfg = sweep.config({"optim.lr": 0.005, "model.params": 600_000})
    assert cfg.train.seed == 7 and abs(count_params(cfg.model) - 600_000) <= 12_000
    trial = sweep.trial_platform("abc_00001")
    assert trial.ray.run_name == "train-abc_00001" and trial.ray.storage_path == str(
        tmp_path / "runs/base-sweep/trials"
    )
    assert not trial.tracking.register_model  # the driver registers the sweep's best trial, once

    with pytest.raises(ConfigError, match=r"ray\.storage_path='s3://bucket/runs' is not allowed for a sweep"):
        load_sweep(sweep_yaml, ["ray.storage_path=s3://bucket/runs"], tmp_path)

    sweep_yaml.write_text(sweep_yaml.read_text().replace("600000", "60"))
    with pytest.raises(ConfigError, match=r"search\.model\.params=60 is rejected"):
        load_sweep(sweep_yaml, [], tmp_path)
    with pytest.raises(ConfigError, match=r"tune\.scheduler='bohb' is not allowed: one of asha, fifo"):
        load_sweep(sweep_yaml, ["tune.scheduler=bohb"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"tune\.time_attr='training_iteration' is not allowed: one of step"
    ):
        load_sweep(sweep_yaml, ["tune.time_attr=training_iteration"], tmp_path)


def test_reports_carry_the_training_clock_for_time_attr_seconds(tmp_path: Path) -> None:
    """ASHA on seconds compares trials of different sizes at equal training time, not at equal steps."""
    from lmplatform.train import RayHooks
    from lmplatform.tune import TrialReporter

    reporter = TrialReporter(queue=None, tokens_per_step=256, n_params=1000)
    hooks = RayHooks(rank=0, report=reporter)
    hooks.on_log(50, {"train_loss": 5.0, "elapsed_s": 12.5})
    during = reporter._result(100, {"dev_loss": 4.0})
    assert during["seconds"] == 12.5 and during["step"] == 100.0 and during["tokens"] == 25600.0
    final = reporter.final(120, {"val_loss": 3.9, "train_seconds": 30.25})
    assert final["seconds"] == 30.25  # the loop's own total, not the last log line's
    RayHooks(rank=1, report=TrialReporter(queue=None, tokens_per_step=1, n_params=1)).on_log(
        1, {"elapsed_s": 1.0}
    )

    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        "search:\n  optim.lr: {grid: [0.001, 0.002]}\ntune: {time_attr: seconds, grace_period: 10}\n"
    )
    assert load_sweep(yaml, base_dir=tmp_path).pcfg.tune.time_attr == "seconds"
    yaml.write_text("search:\n  optim.lr: {grid: [0.001]}\ntune: {time_attr: minutes}\n")
    with pytest.raises(ConfigError, match="tune.time_attr='minutes' is not allowed"):
        load_sweep(yaml, base_dir=tmp_path)
