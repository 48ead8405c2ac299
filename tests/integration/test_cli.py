"""lmplatform/cli.py: `lm train` on Ray (local mode here) and in-process, `lm runs`, errors, entry points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lmplatform import lean, prewarm
from lmplatform.cli import main
from lmplatform.tracking import mlflow_client

from bench.procs import cmdline, descendants
from lm.checkpoint import read_run_record
from tests.integration.conftest import nice_of

pytestmark = pytest.mark.ray


@pytest.fixture
def exp_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text("name: itest\n")
    return path


def test_train_on_ray_prints_results_then_runs_lists_and_shows_it(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(exp_yaml), *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "itest: step 20" in out and "val perplexity" in out and "bits/byte" in out
    assert "make mlflow-ui" in out
    assert "time from command start to the first training step" in out
    assert "--- sample (prompt 'ROMEO:'" in out
    (run,) = mlflow_client(mlflow_store).search_runs(["1"])
    assert f"mlflow: run {run.info.run_id}" in out

    assert main(["runs", "list", "--tracking-uri", mlflow_store]) == 0
    listing = capsys.readouterr().out
    assert run.info.run_id in listing and "FINISHED" in listing and "val ppl" in listing

    assert main(["runs", "show", run.info.run_id[:8], "--tracking-uri", mlflow_store]) == 0
    shown = capsys.readouterr().out
    assert "model.n_embd = 32" in shown
    assert "checkpoints/best" in shown and "model.safetensors" in shown
    assert "models:/lmlab-itest/1 (aliases: best)" in shown


def test_train_local_is_tracked_in_process(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--local", "--no-sample", str(exp_yaml), *tiny_overrides, "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "itest: step 4" in out and "checkpoints:" in out
    (run,) = mlflow_client(mlflow_store).search_runs(["1"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmlab.launcher"] == "local"
    assert "ray.num_workers" not in run.data.params


def test_train_local_without_tracking_is_lm_itself(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--local", "--no-sample", str(exp_yaml), *tiny_overrides, "train.max_steps=2"]
    assert main([*args, "tracking.enabled=false"]) == 0
    assert "mlflow:" not in capsys.readouterr().out
    assert not Path(mlflow_store.removeprefix("sqlite:///")).exists()


def test_user_mistakes_print_one_line_and_exit_2(
    exp_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(exp_yaml), "ray.num_workers=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lm train: error: ray.num_workers=-1 is not allowed: must be >= 0 (0 = local mode)"

    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["runs", "show", "abc", "--tracking-uri", missing]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # looking did not create a store


def test_eval_generate_and_runs_show_address_a_run_every_way(
    exp_yaml: Path,
    tiny_overrides: list[str],
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--local", "--no-sample", str(exp_yaml), *tiny_overrides]) == 0
    capsys.readouterr()
    (run,) = mlflow_client(mlflow_store).search_runs(["1"])
    run_id = run.info.run_id
    local_run = tmp_path / "local-run"
    cache = ["--cache-dir", str(tmp_path / "data")]

    scored = {}
    for ref in (str(local_run), run_id, run_id[:8], "models:/lmlab-itest@best", "models:/lmlab-itest/1"):
        out_json = tmp_path / f"eval-{len(scored)}.json"
        assert main(["eval", ref, *cache, "--json", str(out_json)]) == 0, ref
        captured = capsys.readouterr()
        assert f"{ref}: using" in captured.err
        scored[ref] = json.loads(out_json.read_text())[0]["loss"]
    # every reference is the same best checkpoint
    assert len({round(loss, 6) for loss in scored.values()}) == 1

    assert main(["generate", "models:/lmlab-itest@best", "--max-new-tokens", "4", "--prompt", "KING:"]) == 0
    assert capsys.readouterr().out.startswith("KING:")
    assert main(["eval", "models:/lmlab-itest@nope", *cache]) == 2
    assert "has no alias 'nope'" in capsys.readouterr().err

    # lm runs show takes the run id or the run directory (its run.json names the MLflow run)
    for ref in (run_id[:8], str(local_run)):
        assert main(["runs", "show", ref, "--tracking-uri", mlflow_store]) == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"run {run_id}")
        assert "where:" in shown and str(local_run) in shown and str(local_run / "best") in shown


def test_config_show_includes_the_platform_sections(
    exp_yaml: Path, tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show", str(exp_yaml), *tiny_overrides, "ray.max_failures=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "name: itest" in lines and "model.n_embd: 32" in lines
    assert "ray.num_workers: 0" in lines and "ray.max_failures: 3" in lines
    assert f"ray.storage_path: {tmp_path / 'runs'}" in lines and "ray.run_name: itest" in lines
    assert "tracking.enabled: true" in lines and "tracking.experiment: itest" in lines
    assert main(["config", "show", str(exp_yaml), "ray.num_worker=2"]) == 2
    assert "ray.num_worker" in capsys.readouterr().err


def test_entry_points_and_no_import_time_side_effects(tmp_path: Path) -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lm"]
    assert script.value == "lmplatform.cli:main"
    # importing the platform starts no Ray and opens no MLflow store; `python -m lmplatform` is the CLI
    code = (
        "import sys, lmplatform.cli, lmplatform.train, lmplatform.tracking, lmplatform.config\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'ray', 'mlflow'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []
    helped = subprocess.run(
        [sys.executable, "-m", "lmplatform", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "runs" in helped.stdout and "train" in helped.stdout


def _started(pid: int) -> int:
    """When a process started, in clock ticks since boot (/proc/PID/stat's 22nd field)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _has_gloo_thread(pid: int) -> bool:
    """Whether a process runs a torch.distributed gloo thread (a process group's)."""
    names = []
    for task in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            names.append(task.read_text())
        except OSError:  # a thread that just ended
            pass
    return any("gloo" in name for name in names)


def _maps_torch(pid: int) -> bool:
    """Whether a process has imported torch (its libraries are mapped)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _has_open(pid: int, path: Path) -> bool:
    """Whether a process holds ``path`` open."""
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(fd.readlink())
        except OSError:  # closed meanwhile
            pass
    return path in links


def _actors(pid: int) -> set[str]:
    """The titles of the Ray worker processes under ``pid``: ray::<class> (ray::<class>.<method> while it runs
    one), ray::IDLE before Ray gives a process its actor."""
    return {cmdline(p).split()[0].split(".")[0] for p in descendants(pid) if cmdline(p).startswith("ray::")}


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _wait_for(proc: subprocess.Popen, needle: str, seen: list[str]) -> None:
    """Read the child's stderr until a line contains ``needle`` (the test's timeout bounds the wait)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


@pytest.mark.parametrize(
    ("workers", "sig"),
    [(1, signal.SIGINT), (2, signal.SIGTERM), (0, signal.SIGINT)],
    ids=[
        "1-worker-sigint",
        "2-workers-sigterm",
        "local-mode-sigint",
    ],  # the first is a Ctrl-C on `make train`
)
def test_a_signal_stops_every_rank_at_one_checkpoint_and_ends_the_run_killed(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, tmp_path: Path, workers: int, sig: int
) -> None:
    args = [*tiny_overrides, f"ray.num_workers={workers}", "ray.address=local", "train.max_steps=1000000",
            "train.log_interval=25", "train.eval_interval=0", "train.checkpoint_interval=0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != lean.SWITCH_ENV}  # lmplatform.lean as shipped
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmplatform", "train", "--no-sample", str(exp_yaml), *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    seen: list[str] = []
    try:
        _wait_for(proc, "| loss", seen)  # training is under way
        if workers:  # the training workers run at the command's priority, not Ray's nice 15
            procs = descendants(proc.pid)
            ranks = [p for p in procs if cmdline(p).startswith("ray::RayTrainWorker")]
            assert len(ranks) == workers and {nice_of(p) for p in ranks} == {nice_of(proc.pid)}
            # lmplatform.prewarm: the ranks run in the processes prestarted with the warm-up hook, which started
            # before Train's controller did; a runtime environment spelt differently would leave those idle beside
            # new ranks, and a prestart that never happened would leave new ranks only
            (controller,) = [p for p in procs if cmdline(p).startswith("ray::TrainController")]
            assert all(_started(p) < _started(controller) for p in ranks)
            hooked = [
                p for p in procs if cmdline(p).startswith("ray::") and prewarm.HOOK.encode() in _environ(p)
            ]
            assert sorted(hooked) == sorted(ranks)
            # lmplatform.lean: on the Ray this run started, no dataset manager (lm gives Train no datasets) and no
            # placement-group cleaner (Ray ends with the run); a single DDP rank has no process group (no gloo
            # thread), two ranks need one
            # (an actor's title is ray::<class>, or ray::<class>.<method> while it runs one)
            actors = _actors(proc.pid)
            # Train's own actors under the same titles: what the next line looks for would show
            assert {"ray::TrainController", "ray::RayTrainWorker"} <= actors
            assert not actors & {"ray::DatasetManager", "ray::PlacementGroupCleaner"}
            assert [_has_gloo_thread(p) for p in ranks] == [workers > 1] * workers
            # ... and the controller of a single rank unpickles neither torch's backend config nor lm's loop config
            assert _maps_torch(controller) == (workers > 1) and all(_maps_torch(p) for p in ranks)
            # lean.bare_head: the Ray it started has no API server, no autoscaler monitor and no idle workers.
            # Training does not wait for Train's synchronization actor: at step 25 its process can still be
            # starting, titled ray::IDLE until then; so wait for that (an idle worker Ray keeps would stay).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "ray::SynchronizationActor" not in _actors(proc.pid):
                time.sleep(0.2)
            procs = descendants(proc.pid)
            commands = [cmdline(p) for p in procs]
            assert any(c.startswith("ray::SynchronizationActor") for c in commands)
            assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands)
            extras = ("dashboard/dashboard.py", "autoscaler/_private/monitor.py")
            assert not [c for c in commands if any(extra in c for extra in extras)]
            assert not [c for c in commands if c.startswith("ray::IDLE")]
            # lean.without_coordinator: a Ray that cannot grow gets no autoscaling coordinator (the controller would
            # create it before asking for the ranks, and it is titled ray::AutoscalingCoordinator:<class>)
            assert not [c for c in commands if "AutoscalingCoordinator" in c]
            # tracking.MetricRelay: rank 0 sends its metrics to the driver, which alone opens the MLflow store
            store = Path(mlflow_store.removeprefix("sqlite:///"))
            assert _has_open(proc.pid, store) and not any(_has_open(p, store) for p in ranks)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    run_dir = tmp_path / "runs" / "itest"
    (checkpoint,) = run_dir.glob("step-*")  # one checkpoint, at the step where it stopped
    step = int(checkpoint.name.removeprefix("step-"))
    assert f"at step {step}; checkpoint saved at {checkpoint}" in err
    assert "Run the same command again to resume" in err
    assert "PreemptionWatcher" not in err and "SIGTERM received" not in err  # Ray's noise, filtered safely
    record = read_run_record(run_dir)
    assert record["status"] == "interrupted" and record["step"] == step
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert state["step"] == step
    assert json.loads((checkpoint / "metrics.json").read_text())["step"] == step
    (run,) = mlflow_client(mlflow_store).search_runs(["1"])
    assert run.info.status == "KILLED"
    assert not mlflow_client(mlflow_store).search_registered_models()  # an interrupted run is not registered


@pytest.mark.parametrize("mode", [[], ["--local"]], ids=["ray", "local"])
def test_a_finished_run_says_so_trains_nothing_and_registers_nothing(
    exp_yaml: Path,
    tiny_overrides: list[str],
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
    mode: list,
) -> None:
    args = ["train", *mode, "--no-sample", str(exp_yaml), *tiny_overrides, "train.max_steps=4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "itest: step 4" in first
    client = mlflow_client(mlflow_store)
    (before,) = client.search_runs(["1"])

    assert main(args) == 2  # refused like any other command that cannot do what it was asked
    out, err = capsys.readouterr()
    assert "val perplexity" not in out  # no old number printed as if new
    assert "run itest" in err and "finished at step 4" in err
    assert "--restart to train it again, or --out DIR for a new run" in err
    (after,) = client.search_runs(["1"])
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert len(client.search_model_versions("name = 'lmlab-itest'")) == 1

    # both hints work in this mode: --out trains a new run elsewhere, --restart retrains this one
    assert main([*args, "--out", str(Path(mlflow_store.removeprefix("sqlite:///")).parent / "other")]) == 0
    assert "itest: step 4" in capsys.readouterr().out
    assert main([*args, "--restart"]) == 0
    assert len(client.search_runs(["1"])) == 3


def test_out_sets_the_ray_run_directory(
    exp_yaml: Path, tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere" / "mine"
    assert (
        main(["train", "--no-sample", str(exp_yaml), *tiny_overrides, "train.max_steps=4", "--out", str(out)])
        == 0
    )
    assert f"ray run: {out}" in capsys.readouterr().out
    assert (out / "best").is_dir() and (out / "step-000004").is_dir() and not (tmp_path / "runs").exists()


def test_a_refused_local_override_leaves_the_earlier_mlflow_run_alone(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--local", "--no-sample", str(exp_yaml), *tiny_overrides, "train.max_steps=4"]
    assert main(args) == 0
    assert main([*args, "train.max_steps=8", "model.n_embd=64"]) == 2  # another shape cannot resume this run
    assert "n_embd" in capsys.readouterr().err
    (run,) = mlflow_client(mlflow_store).search_runs(["1"])
    assert run.info.status == "FINISHED" and "lmlab.failure" not in run.data.tags


def test_an_unreachable_ray_address_fails_at_once_and_creates_no_run(
    exp_yaml: Path, tiny_overrides: list[str], mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", str(exp_yaml), *tiny_overrides, "ray.num_workers=1", "ray.address=127.0.0.1:1"]
    assert main(args) == 2  # ray.init alone would retry for minutes, printing only Ray's own warnings
    err = capsys.readouterr().err
    assert "cannot reach Ray at 127.0.0.1:1" in err and "ray start --head" in err
    if Path(mlflow_store.removeprefix("sqlite:///")).exists():  # the store may not even have been created
        client = mlflow_client(mlflow_store)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_reference_that_is_nothing_lists_every_kind_lm_eval_accepts(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "f7b2"]) == 2  # too short for a run id, and no such path
    err = capsys.readouterr().err
    assert "f7b2 does not exist" in err and "MLflow run id (6 or more" in err and "models:/NAME@ALIAS" in err
