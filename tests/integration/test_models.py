"""lmplatform/models.py: every kind of reference Serve accepts resolves to the right weights, with clear errors.

Real MLflow SQLite store per test, real (untrained, seeded) checkpoints registered the way `make train` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lmplatform.models import default_model_ref, load_served_model, resolve_model
from lmplatform.tracking import RunTracker, TrackingError, registered_model_name

from lm.checkpoint import WEIGHTS, CheckpointError, update_run_record
from lm.tokenizer import train_tokenizer
from tests.integration.conftest import register_random_model

MODEL = registered_model_name("itest")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, small_text: str) -> Path:
    return train_tokenizer([small_text], vocab_size=300).save(
        tmp_path_factory.mktemp("tok") / "tokenizer.json"
    )


@pytest.fixture
def registered(make_config, tokenizer_file: Path, tmp_path: Path) -> tuple[RunTracker, Path]:
    """One finished run (run directory tmp/run, best checkpoint tmp/run/best) registered as version 1 @best."""
    tracker, best = register_random_model(*make_config(), tmp_path / "run", tokenizer_file, seed=7)
    assert tracker.model_version == "1"
    return tracker, best


def _same_weights(model: torch.nn.Module, checkpoint: Path) -> bool:
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / WEIGHTS))
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in saved.items())


def test_the_default_is_the_experiments_best_alias_and_info_says_what_was_loaded(registered) -> None:
    tracker, best = registered
    served = load_served_model(None, tracker.uri, "itest")
    assert served.info["source"] == default_model_ref("itest") == f"models:/{MODEL}@best"
    assert served.info["name"] == MODEL
    assert served.info["registered_model"] == MODEL and served.info["version"] == "1"
    assert served.info["run_id"] == tracker.run_id
    assert served.info["metrics"]["val_bpb"] == 2.5 and served.info["metrics"]["dev_bpb"] == 2.25
    assert Path(served.info["checkpoint"]).is_dir()
    assert _same_weights(served.model, best)
    assert not served.model.training and served.cfg.name == "itest"
    assert served.tokenizer.decode(served.tokenizer.encode("ROMEO:")) == "ROMEO:"


@pytest.mark.parametrize("kind", ["version", "run id prefix", "run dir", "checkpoint dir"])
def test_a_version_a_run_id_prefix_and_local_directories_load_the_same_weights(
    registered, kind: str, tmp_path: Path
) -> None:
    tracker, best = registered
    ref = {
        "version": f"models:/{MODEL}/1",
        "run id prefix": tracker.run_id[:8],
        "run dir": str(tmp_path / "run"),
        "checkpoint dir": str(best),
    }[kind]
    served = load_served_model(ref, tracker.uri, "itest")
    assert _same_weights(served.model, best)
    assert served.info["source"] == ref
    assert served.info["run_id"] == tracker.run_id  # local directories: from the run.json MLflow wrote
    assert served.info["version"] == ("1" if kind == "version" else None)
    assert served.info["name"] == (MODEL if kind == "version" else "itest")


def test_a_version_registered_as_a_plain_checkpoint_still_loads(registered, tmp_path: Path) -> None:
    """Versions from before the pyfunc flavor point at the weights-only checkpoint directory itself."""
    tracker, best = registered
    artifact_root = tracker.client.get_run(tracker.run_id).info.artifact_uri
    plain = tracker.client.create_model_version(
        MODEL, source=f"{artifact_root}/checkpoints/best-step-10", run_id=tracker.run_id
    )
    found = resolve_model(f"models:/{MODEL}/{plain.version}", tracker.uri, tmp_path / "dl")
    assert found.checkpoint.name == "best-step-10"
    assert (found.checkpoint / WEIGHTS).read_bytes() == (best / WEIGHTS).read_bytes()
    assert found.version == str(plain.version) and found.metrics["step"] == 10


def test_errors_say_what_is_missing_and_how_to_get_it(registered, tmp_path: Path) -> None:
    tracker, _ = registered
    uri = tracker.uri
    for ref, message in (
        (f"models:/{MODEL}@prod", "has no alias 'prod' (aliases: best); `make train`"),
        (
            "models:/lmlab-other@best",
            "no registered model 'lmlab-other' (registered: lmlab-itest); `make train`",
        ),
        (f"models:/{MODEL}/9", "has no version 9 (versions: 1)"),
        ("abcdef12", "no MLflow run 'abcdef12'"),
    ):
        with pytest.raises(TrackingError) as err:
            load_served_model(ref, uri, "itest")
        assert message in str(err.value), ref
    with pytest.raises(
        TrackingError, match="no registered model 'lmlab-nothing'.*lm train experiments/nothing.yaml"
    ):
        load_served_model(None, uri, "nothing")
    with pytest.raises(TrackingError, match="no MLflow store at .*none.db: train a model first"):
        load_served_model(None, f"sqlite:///{tmp_path / 'none.db'}", "itest")
    with pytest.raises(CheckpointError, match="does not exist: pass a checkpoint directory"):
        load_served_model(str(tmp_path / "nowhere"), uri, "itest")
    empty = tmp_path / "empty-run"
    update_run_record(empty, status="running")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_served_model(str(empty), uri, "itest")


def test_a_model_that_cannot_be_packaged_is_still_registered_as_its_checkpoint(
    make_config, tokenizer_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmplatform.pyfunc

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no room for the model")

    monkeypatch.setattr(lmplatform.pyfunc, "log_pyfunc_model", broken)
    tracker, best = register_random_model(*make_config(), tmp_path / "run", tokenizer_file, seed=9)
    assert tracker.model_version == "1" and tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    version = tracker.client.get_model_version(MODEL, "1")
    assert version.source.endswith("/checkpoints/best-step-10")  # the plain checkpoint, as before pyfunc
    served = load_served_model(None, tracker.uri, "itest")
    assert served.info["version"] == "1" and _same_weights(served.model, best)
