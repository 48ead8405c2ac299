"""Which model to serve or evaluate: a reference resolved to a local weights-only checkpoint, then loaded.

A reference is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the registry), an MLflow run id or a unique
prefix of 6+ of its hex digits (that run's best checkpoint), or a checkpoint or run directory on this machine.
A registry version is an MLflow Model with a pyfunc flavor (:mod:`lmplatform.pyfunc`) whose ``checkpoint``
artifact is the weights-only checkpoint; versions registered before that are the checkpoint directory itself.
Both load here from the same files ``mlflow.pyfunc.load_model`` uses.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.checkpoint import WEIGHTS, CheckpointError, read_metrics, read_run_record
from lm.config import ExperimentConfig
from lm.model import TransformerLM
from lm.tokenizer import Tokenizer
from lmplatform.tracking import (
    BEST_ALIAS,
    RUN_ID_FIELD,
    TrackingError,
    _best_artifact,
    _existing_store,
    _find_run,
    _model_version,
    _one_line,
    registered_model_name,
)

log = logging.getLogger("lmplatform.models")

MLMODEL = "MLmodel"  # the file that makes a directory an MLflow Model
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact key holding the weights-only checkpoint
# An MLflow run id is 32 hex digits; a unique prefix of 6 or more is accepted, as by `lm runs show`.
RUN_ID_PREFIX = re.compile(r"[0-9a-f]{6,32}")
_METRIC_KEYS = ("step", "dev_loss", "dev_ppl", "dev_bpb", "val_loss", "val_ppl", "val_bpb")


@dataclass(frozen=True)
class ModelSource:
    """What a reference resolved to: a local checkpoint directory and where it came from."""

    checkpoint: Path
    source: str  # the reference as given (or the default models:/...@best)
    run_id: str | None = None
    registered_model: str | None = None
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    """A model ready to generate, with what ``/v1/model`` reports about it."""

    model: TransformerLM
    tokenizer: Tokenizer
    cfg: ExperimentConfig
    # name (what /v1/models lists), source (the ref), run_id, registered_model, version,
    # metrics (dev/val bpb, perplexity, step), checkpoint (local dir)
    info: dict[str, Any]


def default_model_ref(experiment: str) -> str:
    """The registry alias ``make train`` moves: ``models:/lmlab-<experiment>@best``."""
    return f"models:/{registered_model_name(experiment)}@{BEST_ALIAS}"


def is_mlflow_ref(ref: str) -> bool:
    """True for ``models:/`` URIs and run ids (or prefixes) that are not also a path here."""
    if ref.startswith("models:/"):
        return True
    return RUN_ID_PREFIX.fullmatch(ref) is not None and not Path(ref).expanduser().exists()


def is_registered(ref: str, tracking_uri: str) -> bool:
    """Whether the store at ``tracking_uri`` has the ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` ``ref``."""
    try:
        _model_version(_existing_store(tracking_uri), ref)
    except TrackingError:
        return False
    return True


def resolve_model(ref: str, tracking_uri: str, dest: Path | None = None) -> ModelSource:
    """The local checkpoint ``ref`` names, downloading MLflow references into ``dest`` (default: a temp dir).

    Raises TrackingError (no store, no such model, alias, version or run) or CheckpointError (no such path).
    """
    if is_mlflow_ref(ref):
        return download_model(ref, tracking_uri, dest)
    from lm.cli import checkpoint_dir

    path = Path(ref).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{ref} does not exist: pass a checkpoint directory (runs/tiny/best), a run directory (runs/tiny), "
            "an MLflow run id (6 or more of its hex digits: `lm runs list`) or models:/NAME@ALIAS"
        )
    checkpoint = checkpoint_dir(ref)
    # A run directory records its MLflow run (a checkpoint sits one level below its run directory).
    run_id = next(
        (
            str(rid)
            for d in (path, checkpoint.parent)
            if d.is_dir() and (rid := _safe_run_record(d).get(RUN_ID_FIELD))
        ),
        None,
    )
    return ModelSource(checkpoint, ref, run_id=run_id, metrics=_metrics(checkpoint))


def load_served_model(
    ref: str | None, tracking_uri: str, experiment: str, device: str = "cpu"
) -> ServedModel:
    """Resolve ``ref`` (None: ``models:/lmlab-<experiment>@best``), load the model onto ``device`` in eval mode.

    MLflow references are downloaded into a temporary directory removed when the process exits.
    """
    from lm.checkpoint import load_model

    ref = ref or default_model_ref(experiment)
    dest = None
    if is_mlflow_ref(ref):
        dest = Path(tempfile.mkdtemp(prefix="lmlab-served-"))
        atexit.register(shutil.rmtree, dest, ignore_errors=True)
    found = resolve_model(ref, tracking_uri, dest)
    model, cfg, tokenizer = load_model(found.checkpoint, device)
    info = {
        "name": found.registered_model or cfg.name,
        "source": found.source,
        "run_id": found.run_id,
        "registered_model": found.registered_model,
        "version": found.version,
        "metrics": found.metrics,
        "checkpoint": str(found.checkpoint),
    }
    log.info("loaded %s from %s", ref, found.checkpoint)
    return ServedModel(model, tokenizer, cfg, info)


def checkpoint_in(local: Path) -> Path:
    """The checkpoint inside a downloaded artifact: the directory itself, or an MLflow Model's checkpoint."""
    if (local / WEIGHTS).is_file():
        return local  # a plain checkpoint (a run's best, or a version registered before the pyfunc flavor)
    mlmodel = local / MLMODEL
    if mlmodel.is_file():
        import yaml

        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT, {})
        inner = local / artifact.get("path", f"artifacts/{CHECKPOINT_ARTIFACT}")
        if (inner / WEIGHTS).is_file():
            return inner
        raise TrackingError(
            f"{local} is an MLflow Model without an lmlab checkpoint ({inner} holds no {WEIGHTS})"
        )
    raise TrackingError(f"{local} holds no {WEIGHTS} and no {MLMODEL}; is it an lmlab checkpoint?")


def download_model(ref: str, uri: str, dest: Path | None = None) -> ModelSource:
    """Download the checkpoint of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a run id (its best one)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = _existing_store(uri)
    name = version = None
    if ref.startswith("models:/"):
        try:
            found = _model_version(client, ref)
        except TrackingError as exc:
            raise TrackingError(f"{exc}{_registry_hint(ref)}") from None
        name, version, run_id = found.name, str(found.version), found.run_id
        # Where its files are: the source itself, or for a models:/<model_id> source the logged model's.
        where = {"artifact_uri": client.get_model_version_download_uri(found.name, found.version)}
        what = f"{ref} (version {found.version} of run {found.run_id})"
    else:
        run = _find_run(client, ref)
        run_id = run.info.run_id
        path = _best_artifact(client, run)
        where = {"run_id": run_id, "artifact_path": path}
        what = f"run {run_id} ({path})"
    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="lmlab-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(**where, dst_path=str(dest), tracking_uri=uri))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"{what}: cannot download its checkpoint: {_one_line(str(exc))}") from exc
    try:
        checkpoint = checkpoint_in(local)
    except TrackingError as exc:
        raise TrackingError(f"{what}: {exc}") from None
    log.info("downloaded %s to %s", what, checkpoint)
    return ModelSource(checkpoint, ref, run_id, name, version, _metrics(checkpoint))


def _registry_hint(ref: str) -> str:
    """How to get a registry reference that does not exist yet."""
    name = ref[len("models:/") :].split("@")[0].rsplit("/", 1)[0]
    experiment = name[len("lmlab-") :] if name.startswith("lmlab-") else None
    if experiment:
        return (
            f"; `make train` (lm train experiments/{experiment}.yaml) registers {name} and points "
            f"@{BEST_ALIAS} at its best version, or pass a run id or checkpoint directory instead"
        )
    return "; pass a run id or a checkpoint directory instead"


def _metrics(checkpoint: Path) -> dict[str, float]:
    try:
        raw = read_metrics(checkpoint)
    except CheckpointError:
        return {}
    return {k: raw[k] for k in _METRIC_KEYS if isinstance(raw.get(k), (int, float))}


def _safe_run_record(path: Path) -> dict[str, Any]:
    try:
        return read_run_record(path)
    except CheckpointError:
        return {}
