"""Screenshots of the real MLflow UI over a sweep, for the README: the runs table and the chart view.

    .venv/bin/python docs/mlflow_screenshots.py [--sweep PARENT_RUN_ID] [--out docs/img]

Starts ``mlflow ui`` over the store (default: this checkout's mlflow.db) and ``chromedriver`` (Debian packages
``chromium`` and ``chromium-driver``) on free ports on 127.0.0.1, both stopped at the end. The view is set the way
the README tells users to set it by hand: "Model training" mode, the sweep's trials only (filter
``tags.mlflow.parentRunId = '<parent>'``), columns = the searched params plus dev/val bits per byte and val
perplexity, sorted by dev bits per byte; the chart view shows MLflow's own dev_* charts of the best 10.
The UI keeps that view in the browser's localStorage, so it is written there before the page loads. WebDriver
is spoken over plain HTTP (no selenium).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dev_bpb", "val_bpb", "val_ppl")


class WebDriver:
    """The few W3C WebDriver commands a screenshot needs."""

    def __init__(self, url: str, width: int, height: int) -> None:
        self.url = url
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
        ]
        options = {"binary": shutil.which("chromium") or "/usr/bin/chromium", "args": args}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        return self._call(
            "POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)}
        )

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))

    def quit(self) -> None:
        self._call("DELETE", f"/session/{self.session}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {seconds:.0f}s") from None
            time.sleep(0.5)


def find_sweep(uri: str, parent: str | None) -> tuple[Any, list[str]]:
    """The sweep's parent run (the newest one tagged lmlab.role=sweep unless given) and its searched keys."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if parent is None:
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, "tags.`lmlab.role` = 'sweep'", order_by=["attributes.start_time DESC"])
        if not runs:
            raise SystemExit(f"no sweep in {uri}: run `make sweep` first")
        run = runs[0]
    else:
        run = client.get_run(parent)
    keys = sorted(k.removeprefix("search.") for k in run.data.params if k.startswith("search."))
    return run, keys


def ui_state(page: dict[str, Any], parent: str, keys: list[str]) -> dict[str, Any]:
    """The experiment page's stored view: the trials, the searched params and the metrics, best first."""
    columns = [f"params.`{k}`" for k in keys] + [f"metrics.`{m}`" for m in METRICS]
    return page | {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent}'",
        "selectedColumns": columns,
        "orderByKey": "metrics.`dev_bpb`",
        "orderByAsc": True,
        "runsHiddenMode": "FIRST_10_RUNS",  # the chart view: the best 10 by dev bits per byte
        "chartsSearchFilter": "dev_",  # its charts: dev_bpb, dev_loss (the curves ASHA judged), dev_ppl
    }


def main(argv: list[str] | None = None) -> int:
    """Take docs/img/mlflow-sweep-table.png and mlflow-sweep-charts.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlflow.db'}")
    parser.add_argument("--sweep", help="the sweep's parent run id (default: the newest sweep)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--size", default="1600x1000", help="browser window WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    run, keys = find_sweep(args.tracking_uri, args.sweep)
    experiment, parent = run.info.experiment_id, run.info.run_id
    ui_port, driver_port = free_port(), free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    started = [
        subprocess.Popen(
            [
                str(mlflow),
                "ui",
                "--backend-store-uri",
                args.tracking_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(ui_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),  # fmt: skip
        subprocess.Popen(
            [shutil.which("chromedriver") or "chromedriver", f"--port={driver_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
    ]
    try:
        ui = f"http://127.0.0.1:{ui_port}"
        wait_for(ui, 120)
        wait_for(f"http://127.0.0.1:{driver_port}/status", 30)
        browser = WebDriver(f"http://127.0.0.1:{driver_port}", width, height)
        try:
            key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState'
            browser.get(f"{ui}/?load=1#/experiments/{experiment}/runs")
            time.sleep(5)  # let the page write its default view first
            page = json.loads(browser.run("return localStorage.getItem(arguments[0]) || '{}'", key))
            browser.run(
                "localStorage.setItem(arguments[0], arguments[1]);"
                "localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"  # Model training mode
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');",
                key, json.dumps(ui_state(page, parent, keys)),
            )  # fmt: skip
            args.out.mkdir(parents=True, exist_ok=True)
            for name, view in (("table", "TABLE"), ("charts", "CHART")):
                # A new query string reloads the page, so the stored view is read afresh.
                browser.get(f"{ui}/?view={name}#/experiments/{experiment}/runs?compareRunsMode={view}")
                time.sleep(8)
                path = args.out / f"mlflow-sweep-{name}.png"
                browser.screenshot(path)
                print(f"wrote {path} (sweep {run.info.run_name}, run {parent})")
        finally:
            browser.quit()
    finally:
        for proc in started:  # each in its own process group: the UI's server workers go with it
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
