"""Tests for lmplatform/sizes.py: the closed-form count equals the real model's, and "about N parameters"."""

from __future__ import annotations

import dataclasses
import re

import pytest
from lmplatform.sizes import count_params, describe, shape_for_params

from lm.config import ConfigError, ModelConfig
from lm.model import TransformerLM

SHAPES = [
    {},  # the tiny preset
    {"bias": False},
    {"tie_weights": False},
    {"bias": False, "tie_weights": False},
    {"n_layer": 3, "n_head": 6, "n_embd": 96, "mlp_dim": 300},
    {"n_layer": 1, "n_head": 3, "n_embd": 33, "vocab_size": 300, "bias": False},  # odd width
    {"n_layer": 6, "n_head": 8, "n_embd": 256, "block_size": 256, "dropout": 0.1},
]


@pytest.mark.parametrize("changes", SHAPES)
def test_count_params_equals_the_models_own_count(changes: dict) -> None:
    cfg = ModelConfig(**changes)
    assert count_params(cfg) == TransformerLM(cfg).num_parameters()


def test_the_tiny_preset_is_658944_and_is_its_own_shape_at_that_target() -> None:
    tiny = ModelConfig()
    assert count_params(tiny) == 658_944
    assert shape_for_params(658_944, tiny) == tiny  # n_embd 128, mlp_dim left None (= 4 * n_embd)


@pytest.mark.parametrize("n_layer", [1, 2, 4, 6])
@pytest.mark.parametrize("target", [300_000, 658_944, 1_000_000, 3_000_000])
def test_shape_for_params_lands_within_2_percent_and_keeps_the_fixed_keys(n_layer: int, target: int) -> None:
    base = ModelConfig(n_layer=n_layer, dropout=0.1, block_size=64)
    shaped = shape_for_params(target, base)
    n = TransformerLM(shaped).num_parameters()
    assert abs(n - target) <= 0.02 * target, describe(shaped)
    assert n == count_params(shaped)
    assert shaped.n_embd % shaped.n_head == 0
    unchanged = ("n_layer", "n_head", "vocab_size", "block_size", "dropout", "bias", "tie_weights")
    assert all(getattr(shaped, k) == getattr(base, k) for k in unchanged)
    assert 3.0 <= shaped.mlp_hidden / shaped.n_embd <= 5.0  # the MLP ratio stays near 4 when it can


# the shipped sweeps' sizes: sweep.yaml (2 layers) and scaling.yaml (4 layers)
@pytest.mark.parametrize(
    ("target", "n_layer"),
    [
        (300_000, 2),
        (1_000_000, 2),
        (3_000_000, 2),
        *((n, 4) for n in (200_000, 400_000, 800_000, 1_600_000, 3_200_000)),
    ],
)
def test_widths_are_multiples_of_8_when_a_shape_allows(target: int, n_layer: int) -> None:
    shaped = shape_for_params(target, ModelConfig(n_layer=n_layer))
    assert shaped.n_embd % 8 == 0 and shaped.mlp_hidden % 8 == 0, describe(shaped)


@pytest.mark.parametrize("n_layer", [4, 6])
def test_without_an_aligned_shape_near_ratio_4_any_multiple_of_n_head_is_used(n_layer: int) -> None:
    shaped = shape_for_params(300_000, ModelConfig(n_layer=n_layer))  # multiples of 8 give ratio 5.3 or 3.1
    assert (
        shaped.n_embd % 8 != 0 and shaped.n_embd % 4 == 0 and 3.2 <= shaped.mlp_hidden / shaped.n_embd <= 5.0
    )


def test_larger_targets_give_wider_models() -> None:
    widths = [shape_for_params(t, ModelConfig()).n_embd for t in (300_000, 1_000_000, 3_000_000)]
    assert widths == sorted(widths) and len(set(widths)) == 3


def test_shape_for_params_keeps_a_custom_mlp_ratio_and_untied_heads() -> None:
    base = ModelConfig(n_embd=64, mlp_dim=128, tie_weights=False, bias=False, n_head=8)  # ratio 2
    shaped = shape_for_params(1_500_000, base)
    assert abs(count_params(shaped) - 1_500_000) <= 30_000
    assert shaped.n_embd % 8 == 0
    assert 1.5 <= shaped.mlp_hidden / shaped.n_embd <= 2.5
    assert not shaped.tie_weights and not shaped.bias


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (5_000, r"model\.params=5,000 is not allowed: the smallest model .* embedding table alone 8,192"),
        (0, r"model\.params=0 is not allowed: must be a positive whole number"),
        (-5, r"model\.params=-5 is not allowed"),
        (2.5, r"model\.params=2\.5 is not allowed: must be a positive whole number"),
        ("lots", r"model\.params='lots' is not allowed"),
        (True, r"model\.params=True is not allowed"),
    ],
)
def test_impossible_targets_raise_config_error_naming_model_params(target: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        shape_for_params(target, ModelConfig())  # type: ignore[arg-type]


def test_the_error_says_the_smallest_reachable_target() -> None:
    base = ModelConfig(vocab_size=4096, n_layer=6, n_head=8)
    with pytest.raises(ConfigError, match=r"ask for at least [\d,]+") as info:
        shape_for_params(20_000, base)
    floor = int(re.search(r"ask for at least ([\d,]+)", str(info.value)).group(1).replace(",", ""))
    assert count_params(shape_for_params(floor, base)) <= floor * 1.02
    with pytest.raises(ConfigError):
        shape_for_params(floor - 1, base)


def test_yaml_spellings_of_a_count_are_accepted() -> None:
    assert shape_for_params("3e5", ModelConfig()) == shape_for_params(300_000, ModelConfig())
    assert shape_for_params(3.0e5, ModelConfig()) == shape_for_params(300_000, ModelConfig())


def test_describe_names_the_count_and_shape() -> None:
    assert describe(dataclasses.replace(ModelConfig())) == (
        "658,944 params (n_layer 2, n_head 4, n_embd 128, mlp 512)"
    )
