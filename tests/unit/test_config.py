"""lm/config.py: loading, overrides, type conversion, validation errors, round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    Section,
    check,
    check_name,
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


def test_unknown_key_suggests_the_full_dotted_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nlayer'; did you mean 'model\.n_layer'\?"):
        load_config(None, ["model.nlayer=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(None, ["optim.lrr=3e-3"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'; did you mean 'optim'"):
        load_config(write(tmp_path / "x.yaml", "optimizer:\n  lr: 1\n"))


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("lr=3e-3", "lr", "optim.lr"),
        ("train.lr=3e-3", "train.lr", "optim.lr"),
        ("n_layer=3", "n_layer", "model.n_layer"),
    ],
)
def test_a_key_in_the_wrong_section_suggests_where_it_lives(override: str, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"unknown key {key!r}; did you mean {suggestion!r}?" in str(err.value)


def test_unknown_section_lists_every_allowed_one_including_lmplatforms(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "x.yaml", "trainer:\n  batch_size: 4\n"))
    message = str(err.value)
    assert "unknown key 'trainer'; did you mean 'train'?" in message
    for section in ("name", "model", "tokenizer", "data", "optim", "train", "sample", "ray", "tracking"):
        assert f" {section}" in message.split("allowed:", 1)[1]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "-x", ".hidden", "a b", "x" * 101, "é"])
def test_experiment_name_must_be_a_safe_directory_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^name=.* is not allowed: 1-100 characters"):
        load_config(None, [f"name={name}"] if name else ["name=''"])


@pytest.mark.parametrize("name", ["tiny", "a", "run-2.b_c", "X" * 100])
def test_check_name_accepts_plain_names(name: str) -> None:
    check_name(name, "ray.run_name")
    assert load_config(None, [f"name={name}"]).name == name


def test_check_name_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.experiment='a/b' is not allowed"):
        check_name("a/b", "tracking.experiment")


def test_check_and_section_are_public() -> None:
    import lm.config as config

    assert issubclass(ModelConfig, Section)
    assert not hasattr(config, "_check") and not hasattr(config, "_Section")
    with pytest.raises(ConfigError, match=r"^k=3 is not allowed: must be odd$"):
        check(False, "k", 3, "must be odd")


def test_out_dir_defaults_to_a_local_run_directory_per_experiment(tmp_path: Path) -> None:
    assert ExperimentConfig().train.out_dir is None
    assert load_config(base_dir=tmp_path).train.out_dir == str(tmp_path / "runs" / "tiny-local")
    cfg = load_config(REPO / "experiments" / "small.yaml", base_dir=tmp_path)
    assert cfg.train.out_dir == str(tmp_path / "runs" / "small-local")
    assert load_config(None, ["name=x", "train.out_dir=elsewhere"], base_dir=tmp_path).train.out_dir == str(
        tmp_path / "elsewhere"
    )


def test_eval_max_batches_defaults_to_the_whole_dev_split() -> None:
    assert ExperimentConfig().train.eval_max_batches is None
    assert load_config(REPO / "experiments" / "tiny.yaml").train.eval_max_batches is None
    assert load_config(None, ["train.eval_max_batches=4"]).train.eval_max_batches == 4
    with pytest.raises(ConfigError, match=r"train\.eval_max_batches=0"):
        load_config(None, ["train.eval_max_batches=0"])


def test_dev_fraction_default_and_limits() -> None:
    assert ExperimentConfig().data.dev_fraction == pytest.approx(0.05)
    assert load_config(None, ["data.dev_fraction=0.2"]).data.dev_fraction == pytest.approx(0.2)
    for bad in ("0", "1", "-0.1"):
        with pytest.raises(ConfigError, match=r"data\.dev_fraction=.* must be in \(0, 1\)"):
            load_config(None, [f"data.dev_fraction={bad}"])
    with pytest.raises(
        ConfigError, match=r"data\.dev_fraction=0\.5 .*data\.val_fraction \(=0\.5\) must be < 1"
    ):
        load_config(None, ["data.dev_fraction=0.5", "data.val_fraction=0.5"])


def test_follow_extends_false_never_reads_another_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "model:\n  n_layer: 3\n")
    child = write(tmp_path / "config.yaml", "extends: base.yaml\nname: child\n")
    assert load_config(child).model.n_layer == 3
    with pytest.raises(ConfigError, match=r"has extends: 'base\.yaml', which is not followed here"):
        load_config(child, follow_extends=False)
    saved = tmp_path / "saved.yaml"
    save_config(load_config(child, base_dir=tmp_path), saved)
    assert load_config(saved, follow_extends=False) == load_config(child, base_dir=tmp_path)


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


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "name: x\nmodel:\n  n_layer: 2\n   n_head: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(f"config file {str(bad)!r} is not valid YAML at line 4, column 10: ")
    assert "<unicode string>" not in message and "\n" not in message
    child = write(tmp_path / "child.yaml", "extends: bad.yaml\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML at line 4"):
        load_config(child)  # the file in the chain that is broken, not the one named on the command line


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
    assert load_config(path, base_dir=tmp_path) == load_config(base_dir=tmp_path)


def test_flatten_and_overrides_helpers() -> None:
    flat = flatten(to_dict(ExperimentConfig()))
    assert flat["model.n_layer"] == 2 and flat["optim.lr"] == pytest.approx(3e-3)
    cfg = with_overrides(ExperimentConfig(), ["model.n_layer=6"])
    assert cfg.model.n_layer == 6


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_shipped_presets_load(name: str) -> None:
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    assert cfg.name == name
