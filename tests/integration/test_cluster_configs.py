"""cluster/: every YAML parses, the launcher config passes Ray's own validation, the images and Ray versions agree
with the Dockerfile and pyproject's pins, and every command, path and import the manifests name exists here and is
accepted by lmlab's own CLI, config loader and Serve app builder. Plus the pure helpers of lmplatform.cluster
(the multi-node checks, job planning, MLflow's Host allow list). Nothing here starts Ray or a server."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmplatform import cluster
from lmplatform.cli import build_parser
from lmplatform.config import RayConfig, TrackingConfig, load_platform_config

from lm.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/lmlab"  # where cluster/Dockerfile puts the checkout


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d) for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in _docs(p) if d["kind"] == kind
    ]


def _pin(name: str) -> str:
    match = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert match, f"no {name} pin in pyproject.toml"
    return match.group(1)


def _dockerfile() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    args["FROM"] = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    args["GPU"] = re.search(r"--build-arg PLATFORM=(cu\d+)", text).group(1)
    return args


def _images(node: Any) -> list[str]:
    """Every `image`, `worker_image` and `head_image` value anywhere in a YAML document."""
    if isinstance(node, dict):
        found = [
            v for k, v in node.items() if k in ("image", "worker_image", "head_image") and isinstance(v, str)
        ]
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _repo_path(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: not inside the image's checkout {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


def test_every_cluster_yaml_parses() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.name for p in files} >= {"aws.yaml", "raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml",
                                       "rayservice.yaml"}  # fmt: skip
    for path in files:
        assert _docs(path), path


def test_dockerfile_builds_on_the_pinned_ray_and_torch() -> None:
    args = _dockerfile()
    assert args["RAY_VERSION"] == _pin("ray") == "2.60.0"
    assert args["TORCH_VERSION"] == _pin("torch")
    assert args["FROM"] == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${PLATFORM}"
    assert (args["PYTHON"], args["PLATFORM"], args["GPU"]) == ("py311", "cpu", "cu128")
    text = (CLUSTER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for name in source.split():
            assert (REPO / name).exists(), f"Dockerfile copies {name}, which is not in the repository"
    # the build context keeps exactly what the image copies
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text()
    assert {"!pyproject.toml", "!lm", "!platform", "!experiments"} <= set(ignore.split())


def test_every_image_is_the_dockerfiles_build_and_ray_versions_match() -> None:
    args = _dockerfile()
    allowed = {
        f"lmlab:ray{args['RAY_VERSION']}-{args['PYTHON']}-{p}" for p in (args["PLATFORM"], args["GPU"])
    }
    images = [i for p in CLUSTER.rglob("*.yaml") for d in _docs(p) for i in _images(d)]
    assert len(images) >= 8 and set(images) == allowed, set(images) ^ allowed
    versions = [d["spec"]["rayVersion"] for _, d in _kind("RayCluster")]
    versions += [d["spec"]["rayClusterConfig"]["rayVersion"] for _, d in _kind("RayService")]
    assert versions and set(versions) == {args["RAY_VERSION"]}


def test_kuberay_objects_are_ray_io_v1_with_token_auth() -> None:
    specs = [d["spec"] for _, d in _kind("RayCluster")] + [
        d["spec"]["rayClusterConfig"] for _, d in _kind("RayService")
    ]
    assert len(specs) == 2
    for spec in specs:
        assert spec["authOptions"]["mode"] == "token"
        secret = spec["authOptions"]["secretName"]
        assert any(d["metadata"]["name"] == secret for _, d in _kind("Secret"))
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert _kind(kind) and all(d["apiVersion"] == "ray.io/v1" for _, d in _kind(kind))
    names = {d["metadata"]["name"] for _, d in _kind("RayCluster")}
    for _, job in _kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in names


def test_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    assert nodes["gpu"]["resources"] == {"CPU": 48, "GPU": 4} and nodes["gpu"]["max_workers"] == 2
    assert nodes["cpu"]["min_workers"] == 0 and prepared["head_node_type"] == "head"
    # the validation is real: the same file with a mistake fails it
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["resourcez"] = broken["available_node_types"]["gpu"].pop(
        "resources"
    )
    with pytest.raises(Exception, match="resource"):
        validate_config(prepare_config(broken))


def test_launcher_starts_token_auth_and_a_tracking_server_lm_accepts() -> None:
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    server = next(c for c in config["head_start_ray_commands"] if "lm mlflow-server" in c)
    argv = shlex.split(server.split("lm ", 1)[1].split(">", 1)[0])
    args = build_parser().parse_args(argv)
    assert args.handler is cluster.mlflow_server_command and args.host == "0.0.0.0"
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_rayjob_entrypoints_are_lmlab_commands_that_load(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lmplatform import cli

    (job,) = _docs(CLUSTER / "kuberay" / name)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "lmplatform"]
    assert (REPO / "platform" / "lmplatform" / "__main__.py").is_file()
    args = build_parser().parse_args(argv[3:])
    config = _repo_path(args.config)
    assert config.is_file(), config
    monkeypatch.chdir(tmp_path)  # the job's cwd is not the checkout: nothing may depend on it
    if args.command == "train":
        assert args.handler is cli.cmd_train
        cfg, pcfg = load_platform_config(config, args.overrides)
        assert pcfg.ray.storage_path == "/mnt/shared/runs" and cfg.data.cache_dir == "/mnt/shared/data"
        assert pcfg.ray.num_workers == 2 and pcfg.ray.placement_strategy == "SPREAD"
        assert pcfg.tracking.uri == env["MLFLOW_TRACKING_URI"]
    else:
        from lmplatform.tune import load_sweep

        assert args.handler is cli.cmd_sweep
        sweep = load_sweep(config, args.overrides)
        assert sweep.path.startswith("/mnt/shared/runs/") and sweep.pcfg.tune.max_concurrent_trials == 4
        assert sweep.pcfg.tracking.uri == env["MLFLOW_TRACKING_URI"]


def test_rayservice_serve_config_matches_the_app_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    (service,) = [d for _, d in _kind("RayService")]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert set(app.args) <= set(importlib.import_module(module).APP_BUILDER_ARGS)
    for key, value in app.runtime_env["env_vars"].items():
        monkeypatch.setenv(key, value)
    args = {**app.args, "config": str(_repo_path(app.args["config"]))}
    built = builder(args)
    assert isinstance(built, Application)
    settings = built._bound_deployment.init_args[0]
    assert settings.serve.replicas == 2 and built._bound_deployment.num_replicas == 2
    assert settings.model_ref == "models:/lmlab-tiny@best"
    assert settings.tracking_uri == app.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    with pytest.raises(ConfigError, match="not allowed"):
        builder({**args, "replicas": 2})
    with pytest.raises(ConfigError, match="overrides"):
        builder({**args, "overrides": "serve.replicas=2"})


def test_mlflow_deployment_command_and_its_host_names() -> None:
    (deployment,) = [d for _, d in _kind("Deployment")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "lm"
    args = build_parser().parse_args(container["command"][1:])
    argv = cluster.mlflow_server_argv(
        host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination, allowed=args.allowed_hosts, repo=REPO,
    )  # fmt: skip
    hosts = argv[argv.index("--allowed-hosts") + 1].split(",")
    from mlflow.server.security_utils import is_allowed_host_header

    uri = yaml.safe_load(_docs(CLUSTER / "kuberay" / "rayjob-train.yaml")[0]["spec"]["runtimeEnvYAML"])
    pod_host = uri["env_vars"]["MLFLOW_TRACKING_URI"].split("://", 1)[1]  # the Host header pods send
    assert is_allowed_host_header(hosts, pod_host)
    assert is_allowed_host_header(hosts, "mlflow.lmlab.svc.cluster.local:5000")
    assert not is_allowed_host_header(hosts, "evil.example.com")


# --------------------------------------------------------------------------------------------------------------
# lmplatform.cluster's pure parts


def test_allowed_hosts_keep_mlflows_defaults_and_add_names() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    assert cluster.allowed_hosts("127.0.0.1") is None  # loopback: MLflow's own default is right
    hosts = cluster.allowed_hosts("0.0.0.0", ["mlflow.lmlab.svc"])
    assert hosts is not None
    for ok in (
        "localhost:5000",
        "127.0.0.1:5000",
        "10.1.2.3:5000",
        "mlflow.lmlab.svc:5000",
        "mlflow.lmlab.svc",
    ):
        assert is_allowed_host_header(hosts, ok), ok
    assert not is_allowed_host_header(hosts, "attacker.example:5000")
    argv = cluster.mlflow_server_argv(repo=REPO)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--allowed-hosts" not in argv
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{REPO / 'mlflow.db'}"
    assert argv[argv.index("--workers") + 1] == "1"  # SQLite: one writer
    pg = cluster.mlflow_server_argv(
        backend_store_uri="postgresql://u@db/mlflow", artifacts_destination="s3://b/a"
    )
    assert "--workers" not in pg and pg[pg.index("--artifacts-destination") + 1] == "s3://b/a"


NODE = {"Alive": True, "Resources": {"CPU": 2.0}}


def test_several_nodes_refuse_a_local_tracking_store() -> None:
    rc = RayConfig(num_workers=2)
    cluster.check_cluster(rc, "sqlite:////x/mlflow.db", [NODE], fixed=True)  # one node: fine
    cluster.check_cluster(rc, "http://mlflow:5000", [NODE, NODE], fixed=True)  # a server: fine
    for uri in ("sqlite:////x/mlflow.db", "file:///x/mlruns"):
        with pytest.raises(cluster.ClusterError, match="tracking server"):
            cluster.check_cluster(rc, uri, [NODE, NODE], fixed=False)
    cluster.check_tracking_node(None, "http://mlflow:5000")  # a server: rank 0 may run anywhere


def test_strict_spread_needs_a_node_per_worker(caplog: pytest.LogCaptureFixture) -> None:
    rc = RayConfig(num_workers=2, placement_strategy="STRICT_SPREAD", cpus_per_worker=2)
    small = {"Alive": True, "Resources": {"CPU": 1.0}}
    cluster.check_cluster(rc, None, [NODE, NODE, small], fixed=True)
    with pytest.raises(cluster.ClusterError, match="only 1 of the cluster's 2 nodes"):
        cluster.check_cluster(rc, None, [NODE, small], fixed=True)
    cluster.check_cluster(rc, None, [NODE, small], fixed=False)  # may autoscale: a warning
    assert "wait until the cluster grows" in caplog.text


def test_placement_strategy_is_validated() -> None:
    assert RayConfig().placement_strategy == "PACK"
    with pytest.raises(
        ConfigError, match=r"ray.placement_strategy='spread'.*one of PACK, SPREAD, STRICT_SPREAD"
    ):
        RayConfig(placement_strategy="spread")
    with pytest.raises(ConfigError, match="ray.placement_strategy.*ray.num_workers >= 1"):
        RayConfig(num_workers=0, placement_strategy="STRICT_SPREAD")


def test_local_tracking_node_is_none_for_a_server() -> None:
    assert cluster.local_tracking_node(TrackingConfig(uri="http://mlflow:5000")) is None
    assert cluster.local_tracking_node(TrackingConfig(enabled=False, uri="sqlite:////x.db")) is None


def test_plan_job_for_this_machine_and_for_a_remote_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(cluster.CLUSTER_DIR_ENV, str(tmp_path / "none"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(cluster.ClusterError, match="make cluster-up"):
        cluster.plan_job("train", "experiments/tiny.yaml", [], repo=REPO)
    monkeypatch.setenv(
        "RAY_ADDRESS", "http://127.0.0.1:8265"
    )  # a head on this machine: the checkout's defaults
    plan = cluster.plan_job("train", "experiments/tiny.yaml", ["ray.num_workers=2"], repo=REPO)
    argv = shlex.split(plan.entrypoint)
    assert argv[:5] == ["python", "-m", "lmplatform", "train", "experiments/tiny.yaml"]
    assert f"ray.storage_path={REPO / 'runs'}" in argv and argv[-1] == "ray.num_workers=2"
    env = plan.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{REPO / 'mlflow.db'}" and env["LMLAB_RAY_JOB"]
    assert plan.runtime_env["working_dir"] == str(REPO) and ".git" in plan.runtime_env["excludes"]
    with pytest.raises(cluster.ClusterError, match="no such file"):
        cluster.plan_job("train", "experiments/nope.yaml", [], repo=REPO)
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-head.example:8265")  # remote: shared storage and a server
    with pytest.raises(cluster.ClusterError, match="--storage"):
        cluster.plan_job("train", "experiments/tiny.yaml", [], repo=REPO)
    with pytest.raises(cluster.ClusterError, match="tracking server"):
        cluster.plan_job("sweep", "experiments/sweep.yaml", [], storage="s3://b/runs", repo=REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    plan = cluster.plan_job("sweep", "experiments/sweep.yaml", [], storage="s3://b/runs", repo=REPO)
    assert "ray.storage_path=s3://b/runs" in plan.entrypoint and "artifact_location" not in plan.entrypoint
    assert plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_working_dir_upload_stays_small() -> None:
    """What `make job` uploads (the checkout less git-ignored files and .git, plus lm and lmplatform)."""
    sizes = [
        cluster.upload_size(REPO),
        cluster.upload_size(REPO / "lm"),
        cluster.upload_size(REPO / "platform"),
    ]
    assert sum(sizes) < 8 * 2**20, sizes


# The README's worked example ("Scaling out"): from 1 CPU worker on a laptop to 8 GPUs on 2 nodes, only YAML lines.
LAPTOP: list[str] = []  # experiments/tiny.yaml as it is: ray.num_workers=1, ray.cpus_per_worker=2
EIGHT_GPUS = [
    "ray.num_workers=8",
    "ray.use_gpu=true",
    "ray.gpus_per_worker=1",
    "ray.cpus_per_worker=4",
    "ray.placement_strategy=PACK",
    "ray.storage_path=s3://YOUR-BUCKET/lmlab/runs",
    "data.cache_dir=/mnt/shared/data",
    "train.device=cuda",
    "train.amp=bf16",
]


def test_worked_example_laptop_to_eight_gpus_on_two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmplatform.train import check_resources

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    _, laptop = load_platform_config(REPO / "experiments" / "tiny.yaml", LAPTOP)
    assert (laptop.ray.num_workers, laptop.ray.use_gpu, laptop.ray.cpus_per_worker) == (1, False, 2)
    cfg, big = load_platform_config(REPO / "experiments" / "tiny.yaml", EIGHT_GPUS)
    assert (big.ray.num_workers, big.ray.use_gpu, big.ray.gpus_per_worker) == (8, True, 1)
    assert cfg.train.device == "cuda" and not big.ray.is_local_storage
    gpu_node = {"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}}  # cluster/aws.yaml's gpu node type
    head = {"Alive": True, "Resources": {"CPU": 0.0}}
    check_resources(big.ray, {"CPU": 96.0, "GPU": 8.0}, fixed=True)  # fits two gpu nodes exactly
    cluster.check_cluster(big.ray, big.tracking.uri, [head, gpu_node, gpu_node], fixed=True)
    with pytest.raises(Exception, match="needs 32 CPU, 8 GPU"):
        check_resources(big.ray, {"CPU": 48.0, "GPU": 4.0}, fixed=True)  # one node is not enough
