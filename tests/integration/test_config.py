"""lmplatform/config.py: the ray: and tracking: sections, their defaults and absolute paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmplatform.config import find_repo_root, load_platform_config

from lm.config import ConfigError

pytestmark = pytest.mark.ray


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    yaml = _write(
        tmp_path / "exp.yaml",
        "name: rel\ndata: {corpus: texts/a.txt, cache_dir: cache}\ntrain: {out_dir: out}\n"
        "ray: {storage_path: ray-runs}\ntracking: {uri: 'sqlite:///db/mlflow.db', artifact_location: arts}\n",
    )
    cfg, pcfg = load_platform_config(yaml, base_dir=tmp_path)
    assert cfg.data.corpus == str(tmp_path / "texts" / "a.txt")
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.train.out_dir == str(tmp_path / "out")
    assert pcfg.ray.storage_path == str(tmp_path / "ray-runs")
    assert pcfg.ray.run_dir == str(tmp_path / "ray-runs" / "rel")
    assert pcfg.tracking.uri == f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert pcfg.tracking.artifact_location == (tmp_path / "arts").as_uri()


def test_defaults_follow_the_experiment_and_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    _write(repo / "pyproject.toml", "[project]\nname = 'x'\n")
    work = repo / "sub" / "dir"
    work.mkdir(parents=True)
    assert find_repo_root(work) == repo
    cfg, pcfg = load_platform_config(None, ["name=exp1"], base_dir=work)
    assert pcfg.ray.num_workers == 1 and pcfg.ray.max_failures == 0 and pcfg.ray.keep_checkpoints == 2
    assert pcfg.ray.run_name == "exp1"
    assert pcfg.ray.strategy == "ddp"
    assert pcfg.ray.storage_path == str(
        work / "runs"
    )  # relative to where the command runs, like train.out_dir
    assert pcfg.tracking.experiment == "exp1"
    assert pcfg.tracking.uri == f"sqlite:///{repo / 'mlflow.db'}"  # four slashes: an absolute path
    assert pcfg.tracking.uri.startswith("sqlite:////")
    assert pcfg.tracking.artifact_location == (repo / "mlartifacts").as_uri()


def test_environment_tracking_uri_wins_over_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    _, pcfg = load_platform_config(None, base_dir=tmp_path)
    assert pcfg.tracking.uri == "http://127.0.0.1:5999"
    assert pcfg.tracking.artifact_location is None  # a tracking server decides where artifacts go


def test_remote_storage_is_left_alone(tmp_path: Path) -> None:
    _, pcfg = load_platform_config(None, ["ray.storage_path=s3://bucket/lmlab"], base_dir=tmp_path)
    assert pcfg.ray.storage_path == "s3://bucket/lmlab"
    assert not pcfg.ray.is_local_storage


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ray.num_workers=-1", "ray.num_workers=-1 is not allowed"),
        ("ray.num_wokers=2", "unknown key 'ray.num_wokers'; did you mean 'ray.num_workers'?"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker=0.0 is not allowed: must be > 0"),
        ("ray.gpus_per_worker=1", "ray.gpus_per_worker=1.0 is not allowed: needs ray.use_gpu=true"),
        ("ray.max_failures=-2", "ray.max_failures=-2 is not allowed"),
        ("ray.run_name=a/b", "ray.run_name='a/b' is not allowed"),
        ("ray.use_gpu=maybe", "ray.use_gpu='maybe' is not a boolean"),
        ("ray.strategy=zero3", "ray.strategy='zero3' is not allowed: one of ddp, fsdp"),
        ("tracking.enabled=sometimes", "tracking.enabled='sometimes' is not a boolean"),
        ("tracking.uri=just/a/dir", "tracking.uri='just/a/dir' is not allowed"),
        ("tracking.experimnt=x", "unknown key 'tracking.experimnt'"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_platform_config(None, [override], base_dir=tmp_path)
    assert message in str(err.value)


def test_fsdp_needs_ray_workers(tmp_path: Path) -> None:
    _, pcfg = load_platform_config(None, ["ray.strategy=fsdp", "ray.num_workers=2"], base_dir=tmp_path)
    assert pcfg.ray.strategy == "fsdp"
    with pytest.raises(ConfigError, match=r"ray.strategy='fsdp' is not allowed: needs ray.num_workers >= 1"):
        load_platform_config(None, ["ray.strategy=fsdp", "ray.num_workers=0"], base_dir=tmp_path)


def test_unknown_top_level_section_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'rayy'; did you mean 'ray'\? \(allowed: .*ray, search, serve, tracking, tune\)",
    ):
        load_platform_config(None, ["rayy.num_workers=1"], base_dir=tmp_path)


def test_local_and_ray_runs_of_one_experiment_never_share_a_directory(tmp_path: Path) -> None:
    cfg, pcfg = load_platform_config(None, ["name=exp1"], base_dir=tmp_path)
    assert cfg.train.out_dir == str(tmp_path / "runs" / "exp1-local")
    assert pcfg.ray.run_dir == str(tmp_path / "runs" / "exp1")
