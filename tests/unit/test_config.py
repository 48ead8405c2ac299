"""lm/config.py: loading, overrides, type conversion, validation errors, round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    flatten,
    load_config,
    save_config,
    to_dict,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_tiny_preset() -> None:
    cfg = load_config()
    assert (cfg.model.vocab_size, cfg.model.n_embd, cfg.model.n_layer, cfg.model.n_head) == (2048, 128, 2, 4)
    assert cfg.model.mlp_hidden == 512


def test_scientific_notation_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML reads 1e-3 as the string "1e-3"; the loader must convert it.
    path = write(tmp_path / "x.yaml", "optim:\n  lr: 1e-3\n  min_lr: 1e-5\ntrain:\n  max_steps: 1e4\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == pytest.approx(1e-5)
    assert cfg.train.max_steps == 10000 and isinstance(cfg.train.max_steps, int)


def test_yaml_booleans_in_string_fields_mean_on_and_off(tmp_path: Path) -> None:
    # YAML 1.1 reads `off` as False; train.amp=off must still mean "off".
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(write(tmp_path / "x.yaml", "train:\n  amp: off\n")).train.amp == "off"


def test_dotted_overrides_apply_after_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "model:\n  n_layer: 3\n")
    cfg = load_config(path, ["model.n_layer=4", "optim.lr=3e-4", "train.compile=true", "sample.top_k=null"])
    assert cfg.model.n_layer == 4
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.compile is True
    assert cfg.sample.top_k is None


def test_extends_merges_sections_and_detects_cycles(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "name: base\nmodel:\n  n_layer: 3\n  n_embd: 64\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\nmodel:\n  n_layer: 5\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.model.n_layer, cfg.model.n_embd) == ("child", 5, 64)
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.n_embd=130", r"model\.n_embd=130 .*divisible by model\.n_head=4"),
        ("model.n_layer=0", r"model\.n_layer=0 .*> 0"),
        ("model.n_layer=2.5", r"model\.n_layer=2\.5 is not an integer"),
        ("model.dropout=1.0", r"model\.dropout=1\.0 .*\[0, 1\)"),
        ("model.dropout=-0.1", r"model\.dropout"),
        ("sample.top_p=0", r"sample\.top_p=0\.0 .*\(0, 1\]"),
        ("sample.top_p=1.5", r"sample\.top_p"),
        ("sample.temperature=-1", r"sample\.temperature=-1\.0 .*>= 0"),
        ("optim.lr=fast", r"optim\.lr='fast' is not a number"),
        ("optim.warmup_steps=5000", r"optim\.warmup_steps=5000 .*train\.max_steps=2000"),
        ("optim.min_lr=1", r"optim\.min_lr=1\.0"),
        ("train.amp=fp8", r"train\.amp='fp8' .*auto, off, bf16, fp16"),
        ("train.compile=maybe", r"train\.compile='maybe' is not a boolean"),
        ("train.device=tpu", r"train\.device='tpu'"),
        ("model.attention=flash", r"model\.attention='flash' .*fused, explicit"),
        ("model.vocab_size=100", r"model\.vocab_size=100 .*>= 258"),
    ],
)
def test_impossible_values_name_key_value_and_allowed(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nlayer'; did you mean 'n_layer'"):
        load_config(None, ["model.nlayer=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'; did you mean 'optim'"):
        load_config(write(tmp_path / "x.yaml", "optimizer:\n  lr: 1\n"))


def test_a_section_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_config(write(tmp_path / "x.yaml", "model: 3\n"))


def test_no_budget_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match="set at least one budget"):
        load_config(None, ["train.max_steps=null"])


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["model.n_layer"])


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="model.n_embd"):
        ModelConfig(n_embd=100, n_head=3)


def test_save_then_load_gives_an_equal_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.n_layer=3", "optim.lr=1e-3", "sample.top_p=null", "train.max_seconds=30"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.out_dir=runs/x", "data.corpus=texts/a.txt"], base_dir=tmp_path)
    assert cfg.train.out_dir == str(tmp_path / "runs" / "x")
    assert cfg.data.corpus == str(tmp_path / "texts" / "a.txt")
    assert load_config(base_dir=tmp_path).data.corpus == "tinyshakespeare"  # a built-in name stays a name


def test_platform_sections_are_tolerated_by_the_lm_loader(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "ray:\n  num_workers: 2\ntracking:\n  enabled: false\n")
    assert load_config(path) == load_config()


def test_flatten_and_overrides_helpers() -> None:
    flat = flatten(to_dict(ExperimentConfig()))
    assert flat["model.n_layer"] == 2 and flat["optim.lr"] == pytest.approx(3e-3)
    cfg = with_overrides(ExperimentConfig(), ["model.n_layer=6"])
    assert cfg.model.n_layer == 6


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_shipped_presets_load(name: str) -> None:
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    assert cfg.name == name
