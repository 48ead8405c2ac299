"""A registered version is an MLflow Model with a pyfunc flavor: it loads in a fresh process through
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` serves it over real HTTP on 127.0.0.1.

The checkpoint is real (seeded, untrained): what is tested is the packaging, not the text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from lmplatform.models import load_served_model
from lmplatform.tracking import RunTracker, registered_model_name
from safetensors.torch import load_file

from lm.generate import iter_generate
from lm.tokenizer import train_tokenizer
from tests.integration.conftest import free_port, register_random_model

MODEL = registered_model_name("itest")
BIN = Path(sys.executable).parent  # mlflow and uvicorn live beside this interpreter


@pytest.fixture
def registered(make_config, small_text: str, tmp_path: Path) -> tuple[RunTracker, Path]:
    """One run whose best checkpoint is registered as version 1 (alias best), the way `make train` does."""
    cfg, pcfg = make_config("sample.max_new_tokens=12", "sample.top_k=7")
    tokenizer = train_tokenizer([small_text], vocab_size=300).save(tmp_path / "tokenizer.json")
    tracker, best = register_random_model(cfg, pcfg, tmp_path / "run", tokenizer, seed=3)
    # logging the model points MLflow's global URI at the store for a moment: everything is as it was after
    assert os.environ["MLFLOW_TRACKING_URI"] == pcfg.tracking.uri
    return tracker, best


def _greedy(checkpoint: Path, prompt: str, n: int) -> str:
    """What lm itself generates greedily: the reference the pyfunc model must reproduce."""
    from lm.checkpoint import load_model

    model, _, tok = load_model(checkpoint)
    new = []
    for token in iter_generate(model, torch.tensor([tok.encode(prompt)]), n, 0.0, eos_id=tok.eos_id):
        if int(token[0]) == tok.eos_id:
            break
        new.append(int(token[0]))
    return tok.decode(new)


def _env(uri: str, tmp_path: Path) -> dict[str, str]:
    """A child's environment: this store, this venv's tools first, and no lmlab source on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(tmp_path),
    }
    return env


def test_the_registered_version_loads_in_a_fresh_process_with_only_lm_and_mlflow(
    registered, tmp_path
) -> None:
    tracker, best = registered
    script = f"""
import json, sys
import mlflow.pyfunc
model = mlflow.pyfunc.load_model("models:/{MODEL}@best")
out = {{
    "greedy": model.predict(["ROMEO:", "JULIET:"], params={{"max_new_tokens": 6, "temperature": 0.0}}),
    "seeded": [model.predict(["ROMEO:"], params={{"seed": 5}})[0] for _ in range(2)],
    "default": model.predict("ROMEO:"),
    "params": {{p.name: p.default for p in model.metadata.get_params_schema().params}},
    "lmplatform_imported": any(m == "lmplatform" or m.startswith("lmplatform.") for m in sys.modules),
    "lm_from": sys.modules["lm"].__file__,
}}
try:
    model.predict(["ROMEO:"], params={{"top_p": 1.5}})
except Exception as exc:
    out["bad_top_p"] = str(exc)
print("RESULT " + json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(tracker.uri, tmp_path),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["greedy"] == [_greedy(best, "ROMEO:", 6), _greedy(best, "JULIET:", 6)]
    assert out["seeded"][0] == out["seeded"][1]  # a seed fixes the sample
    assert len(out["default"]) == 1 and isinstance(out["default"][0], str)
    # the defaults are the checkpoint's sample: settings; None filters become their "off" values
    assert out["params"] == {"max_new_tokens": 12, "temperature": 0.8, "top_k": 7, "top_p": 0.95, "seed": 1}
    assert not out["lmplatform_imported"]
    assert "/models/m-" in out["lm_from"] and out["lm_from"].endswith("/code/lm/__init__.py")  # packaged lm
    assert "params.top_p=1.5: must be in (0, 1]" in out["bad_top_p"]


def test_serve_loads_the_same_weights_the_pyfunc_model_packages(registered) -> None:
    tracker, best = registered
    served = load_served_model(None, tracker.uri, "itest")
    assert "/artifacts/checkpoint" in served.info["checkpoint"]  # inside the MLflow Model, not beside it
    state = served.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in load_file(str(best / "model.safetensors")).items())


def test_mlflow_models_serve_answers_invocations_over_http(registered, tmp_path: Path) -> None:
    tracker, best = registered
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@best", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_env(tracker.uri, tmp_path), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
            time.sleep(0.5)
        body = {"inputs": ["ROMEO:"], "params": {"max_new_tokens": 6, "temperature": 0.0}}
        ok = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"predictions": [_greedy(best, "ROMEO:", 6)]}
        bad = httpx.post(f"{url}/invocations", json={"inputs": ["ROMEO:"], "params": {"max_new_tokens": 0}})
        assert bad.status_code == 400 and "params.max_new_tokens=0" in bad.json()["message"]
        again = httpx.post(f"{url}/invocations", json=body, timeout=60)  # still serving after a bad request
        assert again.status_code == 200 and again.json() == ok.json()
    finally:
        os.killpg(server.pid, 15)  # its own session: mlflow and the uvicorn it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=10)
        log.close()
