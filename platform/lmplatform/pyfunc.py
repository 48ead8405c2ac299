"""An lmlab checkpoint as an MLflow Model with a pyfunc flavor: prompt strings in, completions out.

Logged as a model from code: MLflow copies this file into the model and runs it on load under a module name of
its own (``code_model_<hex>``), where :func:`mlflow.models.set_model` registers :class:`LMPyfuncModel`; imported
as ``lmplatform.pyfunc`` it has no side effect. It imports only ``lm`` (packaged with the model through
``code_paths``), torch and mlflow, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

CHECKPOINT_ARTIFACT = "checkpoint"  # the artifact key: the weights-only checkpoint directory
MAX_NEW_TOKENS_LIMIT = 4096  # per prompt; a scoring server should not be asked for unbounded work
# The params a caller may pass to predict (and in the "params" of a /invocations request), with their types.
PARAM_TYPES = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


class LMPyfuncModel(mlflow.pyfunc.PythonModel):
    """Generates a completion for each prompt (the prompt itself not repeated), on CPU.

    Params: max_new_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1.0 = off), seed; their defaults
    are the checkpoint's ``sample:`` settings, recorded in the signature. Each prompt gets its own generator
    seeded with ``seed``, so a prompt's completion does not depend on the other prompts of the call.
    """

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact (weights, config, tokenizer)."""
        from lm.checkpoint import load_model

        self.model, self.cfg, self.tokenizer = load_model(context.artifacts[CHECKPOINT_ARTIFACT], "cpu")

    # A DataFrame hint is what pyfunc passes after enforcing our signature, and the one hint from which MLflow
    # infers no second signature (a list[str] hint would replace ours, params and all).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """One completion per prompt: a list of strings, a string, or a one-column DataFrame of strings."""
        prompts = prompts_from(model_input)
        p = self._params(params or {})
        return [self._complete(prompt, p) for prompt in prompts]

    def _params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        sample = self.cfg.sample
        p: dict[str, Any] = {
            "max_new_tokens": sample.max_new_tokens,
            "temperature": sample.temperature,
            "top_k": sample.top_k or 0,
            "top_p": sample.top_p if sample.top_p is not None else 1.0,
            "seed": sample.seed,
        }
        unknown = sorted(set(given) - set(PARAM_TYPES))
        if unknown:
            raise _invalid(f"unknown params {unknown}: allowed are {sorted(PARAM_TYPES)}")
        for key, value in given.items():
            if value is None:
                continue
            kind = PARAM_TYPES[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind is int and value != int(value))
            ):
                raise _invalid(
                    f"params.{key}={value!r}: must be {'an integer' if kind is int else 'a number'}"
                )
            p[key] = kind(value)
        if not 1 <= p["max_new_tokens"] <= MAX_NEW_TOKENS_LIMIT:
            raise _invalid(
                f"params.max_new_tokens={p['max_new_tokens']}: must be in 1..{MAX_NEW_TOKENS_LIMIT}"
            )
        if not p["temperature"] >= 0.0:  # also NaN
            raise _invalid(f"params.temperature={p['temperature']}: must be >= 0 (0 = greedy)")
        if p["top_k"] < 0:
            raise _invalid(f"params.top_k={p['top_k']}: must be >= 0 (0 = off)")
        if not 0.0 < p["top_p"] <= 1.0:
            raise _invalid(f"params.top_p={p['top_p']}: must be in (0, 1] (1 = off)")
        return p

    def _complete(self, prompt: str, p: Mapping[str, Any]) -> str:
        import torch

        from lm.generate import iter_generate

        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        idx = torch.tensor([ids], dtype=torch.long)
        generator = torch.Generator().manual_seed(p["seed"])
        new: list[int] = []
        steps = iter_generate(
            self.model, idx, p["max_new_tokens"], p["temperature"], p["top_k"] or None,
            p["top_p"] if p["top_p"] < 1.0 else None, self.tokenizer.eos_id, generator,
        )  # fmt: skip
        for token in steps:
            t = int(token[0])
            if t == self.tokenizer.eos_id:
                break
            new.append(t)
        return self.tokenizer.decode(new)


def prompts_from(model_input: Any) -> list[str]:
    """The prompts in what pyfunc hands ``predict``: a list, a string, a Series, an array or a DataFrame."""
    value = model_input
    if hasattr(value, "columns"):  # a DataFrame: its only column
        if len(value.columns) != 1:
            raise _invalid(f"expected one column of prompts, got columns {list(value.columns)}")
        value = value.iloc[:, 0]
    if isinstance(value, str):
        value = [value]
    elif hasattr(value, "tolist"):  # a Series or an array
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"expected prompt strings, got {type(model_input).__name__}")
    return list(value)


def signature(sample: Any) -> Any:
    """Strings in, strings out, with the params (defaults: the checkpoint's ``sample:`` settings)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    defaults = {
        "max_new_tokens": sample.max_new_tokens,
        "temperature": float(sample.temperature),
        "top_k": sample.top_k or 0,
        "top_p": float(sample.top_p) if sample.top_p is not None else 1.0,
        "seed": sample.seed,
    }
    params = ParamSchema([
        ParamSpec(key, DataType.long if PARAM_TYPES[key] is int else DataType.double, value)
        for key, value in defaults.items()
    ])  # fmt: skip
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),  # unnamed: a plain list of prompts validates
        outputs=Schema([ColSpec(DataType.string)]),
        params=params,
    )


def requirements() -> list[str]:
    """What the model needs installed: mlflow and lm's own dependencies, pinned to this environment's."""
    import importlib.metadata

    import torch

    pins = [f"torch=={torch.__version__.split('+')[0]}"]  # a local suffix (+cpu) is no PyPI version
    for name in ("mlflow", "tokenizers", "safetensors", "numpy", "pyyaml"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(tracking_uri: str, run_id: str, checkpoint: Path, name: str, step: int = 0) -> Any:
    """Log ``checkpoint`` (weights-only) as a pyfunc MLflow Model of run ``run_id``; returns the LoggedModel.

    The model is a LoggedModel of the run's experiment (``models:/<model_id>``), linked to the run as an output
    at ``step``; :func:`register_logged_model` makes it a registry version.
    """
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    import lm
    from lm.config import load_config

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    sample = load_config(checkpoint / "config.yaml", follow_extends=False).sample
    with tempfile.TemporaryDirectory(prefix="lmlab-pyfunc-") as tmp:
        code = Path(tmp) / "lm"  # the package without bytecode caches and training corpora
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "corpora")
        shutil.copytree(Path(lm.__file__).parent, code, ignore=skip)
        logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
        saved_path = list(sys.path)  # checking the input example puts the model's code/ first on sys.path
        try:
            with _global_tracking_uri(tracking_uri):  # log_model reads the global URI
                mlflow.pyfunc.log_model(
                    name=name,
                    python_model=__file__,
                    artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                    code_paths=[str(code)],
                    signature=signature(sample),
                    input_example=(["ROMEO:"], {"max_new_tokens": 4}),  # also checks that the model answers
                    pip_requirements=requirements(),
                    model_id=logged.model_id,
                )
        finally:
            sys.path[:] = saved_path
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def register_logged_model(
    tracking_uri: str, name: str, logged: Any, tags: Mapping[str, str], description: str
) -> Any:
    """A new version of registered model ``name`` (which must exist) whose source is ``models:/<model_id>``."""
    from mlflow import MlflowClient

    # The SQL registry looks a models:/ source up through the global tracking URI (an MLflow TODO), so point it
    # at this store for the call; the version then resolves to the logged model's artifact location.
    with _global_tracking_uri(tracking_uri):
        return MlflowClient(tracking_uri).create_model_version(
            name, source=logged.model_uri, run_id=logged.source_run_id, tags=dict(tags),
            description=description, model_id=logged.model_id,
        )  # fmt: skip


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then exactly as it was.

    Not MLflow's own ``_use_tracking_uri``: restoring an unset URI also deletes $MLFLOW_TRACKING_URI from the
    environment, which sent every later command of the process to another store.
    """
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _invalid(message: str) -> MlflowException:
    """An error the scoring server answers with 400 (not 500)."""
    return MlflowException.invalid_parameter_value(message)


if __name__.startswith("code_model_"):  # only when MLflow loads this file as the model's code
    from mlflow.models import set_model

    set_model(LMPyfuncModel())
