"""The ``lm`` console script: lm's parser, with ``train`` run on Ray Train + MLflow and a ``runs`` verb.

``lm train CONFIG [overrides]`` trains on Ray (``ray:`` section), tracked in MLflow (``tracking:`` section);
``lm train --local`` keeps lm's in-process loop, still tracked in MLflow unless ``tracking.enabled=false``.
``lm runs list|show`` prints MLflow runs in the terminal. User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from lm import cli as lm_cli
from lm.config import ConfigError, ExperimentConfig
from lm.data import prepare_data
from lm.train import train
from lmplatform.config import PlatformConfig, load_platform_config
from lmplatform.tracking import RunTracker, TrackingError, list_runs, show_run, start_run
from lmplatform.train import PlatformError

log = logging.getLogger("lmplatform")
ERRORS: tuple[type[Exception], ...] = (*lm_cli.USER_ERRORS, PlatformError, TrackingError)


def _process_start() -> float:
    """When this process started, so that "time to first step" includes the interpreter's start and the imports.

    Linux: the process's start in clock ticks since boot (/proc/self/stat) against the time since boot. Elsewhere
    psutil, where it is installed (Ray vendors its own, which is not importable before ``import ray``); else now.
    """
    try:
        after_name = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started_ticks = int(after_name[19])  # field 22, starttime; the fields after the name start at field 3
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock starttime counts on
        return time.time() - (since_boot - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME (not Linux)
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or unreadable: count from now
        return time.time()


# Appended to a finished run's message; both options work in both modes (--out sets the Ray run directory too).


def cmd_train(args: argparse.Namespace) -> int:
    """Train on Ray Train (or in this process with --local), track in MLflow, print results and a sample.

    A finished run is not trained again: the command says so, with the step and perplexity it finished at,
    and exits 2 like any other refused command, having written nothing.
    """
    from lm.train import RunFinishedError

    started_at = _process_start()
    try:
        if args.local:
            cfg, pcfg = load_platform_config(args.config, lm_cli.overrides_from_args(args))
            return _train_local(args, cfg, pcfg)
        cfg, pcfg = load_platform_config(args.config, _ray_overrides(args))
        return _train_ray(args, cfg, pcfg, started_at)
    except RunFinishedError as exc:
        raise PlatformError(f"{exc}; {lm_cli.FINISHED_HINT}") from exc


def _ray_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides for a Ray run: ``--out DIR`` is the run directory, ``ray.storage_path``/``ray.run_name``."""
    overrides = list(args.overrides)
    if args.out:
        out = Path(args.out).expanduser()
        overrides += [f"ray.storage_path={out.parent}", f"ray.run_name={out.name}"]
    return overrides


def _train_ray(
    args: argparse.Namespace, cfg: ExperimentConfig, pcfg: PlatformConfig, started_at: float
) -> int:
    """``lm train`` on Ray: SIGINT/SIGTERM stop every worker at one checkpoint, exit 130, and a re-run resumes."""
    import ray.train

    from lmplatform.train import StopRequest, run_training

    stop = StopRequest()
    try:
        with stop.on_signals():
            outcome = run_training(cfg, pcfg, restart=args.restart, started_at=started_at, stop=stop)
    except ray.train.TrainingFailedError as exc:
        print(f"lm train: training failed on Ray: {_failure_summary(exc)} (traceback above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lm train: interrupted before training started; nothing was trained", file=sys.stderr)
        return 130
    if outcome.interrupted:
        _print_interrupted(stop.signal_name, outcome.step, outcome.final_checkpoint, outcome.tracker)
        return 130
    m = outcome.metrics
    _print_summary(cfg, outcome.step, m.get("train_seconds"), m, outcome.tracker, outcome.best_checkpoint)
    print(f"ray run: {outcome.run_dir} (best checkpoint: {outcome.best_checkpoint})")
    if outcome.resumed_from_step:
        print(f"resumed from step {outcome.resumed_from_step}")
    if outcome.time_to_first_step is not None:
        print(f"time from command start to the first training step: {outcome.time_to_first_step:.1f}s")
    if outcome.best_checkpoint is not None and not args.no_sample:
        lm_cli.print_sample(outcome.best_checkpoint, cfg)
    return 0


def _print_interrupted(why: str | None, step: int, checkpoint: object, tracker: RunTracker | None) -> None:
    """lm's message for a stopped run, plus how its MLflow run ended."""
    lm_cli.print_interrupted(why, step, checkpoint)
    if tracker is not None:
        print(f"mlflow: run {tracker.run_id} ended KILLED", file=sys.stderr)


def _failure_summary(exc: Exception) -> str:
    """The first worker's (or the controller's) exception in one line."""
    from lmplatform.train import failure_reason

    return failure_reason(exc)


def _train_local(args: argparse.Namespace, cfg: ExperimentConfig, pcfg: PlatformConfig) -> int:
    """lm's in-process loop, with MLflow hooks when tracking is on.

    This process holds the run directory's lock and checks that the run can start (finished, shape or
    tokenizer changes) before the first MLflow write, so a refused command leaves MLflow as it was.
    """
    from lm.checkpoint import run_lock
    from lm.train import preflight, resolve_device

    if not pcfg.tracking.enabled:
        return lm_cli.cmd_train(args)
    out_dir = Path(cfg.train.out_dir)
    with run_lock(out_dir):
        data = prepare_data(cfg, progress=True)
        resumes = preflight(cfg, out_dir, resume=not args.restart, data=data) is not None
        tracker = start_run(
            cfg,
            pcfg,
            str(out_dir),
            launcher="local",
            resume=resumes,  # reopen the MLflow run only when a checkpoint is resumed
            tokenizer_path=data.tokenizer_path,
        )
        assert tracker is not None
        with tracker.track():
            result = train(cfg, data=data, hooks=tracker.hooks(), resume=not args.restart, lock=False)
            tracker.conclude(
                cfg, interrupted=result.interrupted, final=result.last_checkpoint, best=result.best_checkpoint,
                trained_steps=result.trained_steps, register=pcfg.tracking.register_model,
                device=resolve_device(cfg.train.device),  # what train() resolved it to, the same way
            )  # fmt: skip
    if result.interrupted:
        _print_interrupted("signal", result.step, result.last_checkpoint, tracker)
        return 130
    _print_summary(cfg, result.step, result.elapsed, result.metrics, tracker, result.best_checkpoint)
    print(f"checkpoints: {result.out_dir} (best: {result.best_checkpoint})")
    if result.best_checkpoint is not None and not args.no_sample:
        lm_cli.print_sample(result.best_checkpoint, cfg)
    return 0


def _print_summary(
    cfg: ExperimentConfig,
    step: int,
    seconds: float | None,
    m: dict[str, float],
    tracker: RunTracker | None,
    best: Path | None,
) -> None:
    from lm.checkpoint import read_metrics

    lm_cli.print_result(cfg.name, step, seconds, m)
    if best is not None:
        lm_cli.print_best(read_metrics(best), step)
    if tracker is None:
        return
    print(f"mlflow: run {tracker.run_id} in experiment {tracker.experiment!r} at {tracker.uri}")
    if tracker.model_version is not None:
        print(f"        registered as models:/lmlab-{tracker.experiment}/{tracker.model_version}")
        if tracker.alias_note:
            print(f"        {tracker.alias_note}")
    print(f"        browse with `make mlflow-ui`, or `lm runs show {tracker.run_id}`")


def cmd_runs_list(args: argparse.Namespace) -> int:
    """Print the MLflow runs, newest first."""
    print(list_runs(_tracking_uri(args), args.experiment, args.max_results))
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    """Print one MLflow run in full: where its checkpoints, best checkpoint and plots are, metrics, params."""
    print(show_run(_tracking_uri(args), _mlflow_run_id(args.run_id)))
    return 0


def cmd_runs_compare(args: argparse.Namespace) -> int:
    """Print runs side by side, a sweep's parent expanded to its trials, sorted by dev bits per byte."""
    from lmplatform.compare import compare_runs

    print(compare_runs(_tracking_uri(args), [_mlflow_run_id(ref) for ref in args.run_ids]))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run or resume a sweep; print its trials, the best trial and where MLflow has it. With ``--size-for``,
    answer "which size for N minutes?" from the sweep's finished scaling study instead (nothing runs)."""
    if args.size_for is not None:
        from lmplatform.scaling import ScalingError, size_for_sweep

        try:
            print(size_for_sweep(args.config, args.overrides, args.size_for))
        except ScalingError as exc:
            raise PlatformError(str(exc)) from None
        return 0
    from lmplatform.tune import sweep_command  # imports Ray Tune: only for this verb

    return sweep_command(args.config, args.overrides)


def _mlflow_run_id(ref: str) -> str:
    """A run id (or prefix) as given, or the MLflow run a run directory's run.json records."""
    from lm.checkpoint import CheckpointError, read_run_record

    path = Path(ref).expanduser()
    if not path.is_dir():
        return ref
    run_id = read_run_record(path).get("mlflow_run_id")
    if not run_id:
        raise CheckpointError(f"{ref}: no MLflow run recorded in {path / 'run.json'} (was it tracked?)")
    return str(run_id)


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved configuration, lm's sections and the platform's (ray:, tracking:), one key a line."""
    import dataclasses

    from lm.config import to_dict

    cfg, pcfg = load_platform_config(args.config, lm_cli.overrides_from_args(args))
    print(lm_cli.format_settings({**to_dict(cfg), **dataclasses.asdict(pcfg)}))
    return 0


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """lm's checkpoint and run directories, plus MLflow references (downloaded into a local cache).

    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` from the registry, or a run id (or a unique prefix of one)
    that is not also a path here.
    """
    from lmplatform.models import is_mlflow_ref, resolve_model  # one resolution for eval, generate and serve

    ref = args.checkpoint
    if not is_mlflow_ref(ref):
        return resolve_model(ref, "").checkpoint
    import atexit
    import shutil
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="lmlab-model-"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)  # a copy for this command only
    path = resolve_model(ref, _tracking_uri(args), dest).checkpoint
    print(f"{ref}: using checkpoint {path}", file=sys.stderr)
    return path


def _tracking_uri(args: argparse.Namespace) -> str:
    tracking_uri = getattr(args, "tracking_uri", None)
    overrides = [f"tracking.uri={tracking_uri}"] if tracking_uri else []
    return load_platform_config(None, overrides)[1].tracking.uri or ""


def build_parser() -> argparse.ArgumentParser:
    """lm's parser with the platform's ``train`` handler and the ``runs`` verb."""
    parser = lm_cli.build_parser()
    sub = _subcommands(parser)
    train_parser = sub.choices["train"]
    train_parser.description = (
        "Train on Ray Train (ray: section) with MLflow tracking; --local runs in-process."
    )
    train_parser.set_defaults(handler=cmd_train)
    store_help = "MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    for verb in ("eval", "generate"):
        p = sub.choices[verb]
        p.set_defaults(resolve=resolve_checkpoint)
        p.add_argument("--tracking-uri", help=f"{store_help}, for run ids and models:/ URIs")
        p.description = (
            "CHECKPOINT: a checkpoint directory, a run directory (its best checkpoint), an MLflow run id (or a "
            "unique prefix), or a registered model: models:/NAME@ALIAS, models:/NAME/VERSION."
        )
    _subcommands(sub.choices["config"]).choices["show"].set_defaults(handler=cmd_config_show)

    p = sub.add_parser("runs", help="list and inspect MLflow runs")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = runs_sub.add_parser("list", help="runs, newest first, with the params that differ between them")
    p.add_argument("--experiment", help="only this experiment (default: all)")
    p.add_argument("-n", "--max-results", type=int, default=50)
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(handler=cmd_runs_list)
    p = runs_sub.add_parser(
        "show", help="one run: where its checkpoints and plots are, tags, params, metrics, model versions"
    )
    p.add_argument("run_id", metavar="RUN", help="a run id, a unique prefix of one, or a run directory")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(handler=cmd_runs_show)
    p = runs_sub.add_parser(
        "compare", help="runs side by side (a sweep's parent run expands to its trials), by dev bits/byte"
    )
    p.add_argument("run_ids", nargs="+", metavar="RUN", help="run ids, unique prefixes, sweep parents")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(handler=cmd_runs_compare)
    p = sub.add_parser(
        "sweep",
        help="search a space over an experiment with Ray Tune (one Ray Train run per trial), tracked in MLflow",
        description="Run the sweep FILE describes (search: and tune: sections); running it again resumes it.",
    )
    p.add_argument("config", metavar="FILE", help="a sweep YAML, e.g. experiments/sweep.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. tune.num_samples=4")
    p.add_argument(
        "--size-for", type=float, metavar="MINUTES",
        help="answer from FILE's finished scaling study (tune.study: scaling): the compute-optimal parameter "
        "count, with its band, for MINUTES of training; runs nothing",
    )  # fmt: skip
    p.set_defaults(handler=cmd_sweep)
    _add_serve_parsers(sub)
    from lmplatform.cluster import add_parsers as add_cluster_parsers  # cluster, job, mlflow-server

    add_cluster_parsers(sub)
    return parser


def _add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    """``lm serve`` and ``lm generate --url`` (the handlers live in lmplatform.serve, imported when used)."""
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Ray Serve (OpenAI-compatible completions, streaming, batching)",
        usage="%(prog)s [options] [CONFIG] [KEY=VALUE ...]",
        description="Serve MODEL (default: the experiment's models:/lmlab-<name>@best) until Ctrl-C or SIGTERM; "
        "settings from CONFIG's serve: section (e.g. experiments/serve.yaml) and serve.KEY=VALUE overrides.",
    )
    p.add_argument(
        "config", nargs="?", default=None, help="experiment YAML (default: the built-in tiny preset)"
    )
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. serve.replicas=2")
    p.add_argument(
        "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id or a directory"
    )
    p.add_argument("--host", help="interface to bind (default serve.host: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default serve.port: 8000)")
    p.add_argument(
        "--stop", action="store_true", help="stop the lm serve recorded in serve.pid_file, and exit"
    )
    p.set_defaults(handler=cmd_serve)
    p = sub.choices["generate"]
    for action in p._actions:
        if action.dest == "checkpoint":
            action.nargs, action.default = "?", None
            action.help = f"{action.help} (or --url)"
    p.add_argument(
        "--url", help="stream from a running `lm serve` at this URL instead (http://127.0.0.1:8000)"
    )
    p.set_defaults(handler=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    """``lm serve``: run the Serve application in the foreground; ``--stop`` stops one started elsewhere."""
    from lmplatform.serve import serve_command

    return serve_command(args)


def cmd_generate(args: argparse.Namespace) -> int:
    """``lm generate``: from a checkpoint (lm's), or streamed from a running server with ``--url``."""
    if args.url:
        from lmplatform.serve import generate_command

        if args.precision != "fp32":
            raise ConfigError(
                f"--precision {args.precision} applies to a local checkpoint; a server runs at its own "
                "serve.precision (lm serve ... serve.precision=int8)"
            )
        return generate_command(args)
    if args.checkpoint is None:
        from lm.checkpoint import CheckpointError

        raise CheckpointError("lm generate needs a CHECKPOINT (a directory, run id or models:/ URI) or --url")
    return lm_cli.cmd_generate(args)


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lm`` console script and ``python -m lmplatform``."""
    return lm_cli.run(build_parser(), argv, ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
