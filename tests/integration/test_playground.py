"""The playground page (GET / of lmplatform/serve.py) in a real headless Chromium against real Serve apps.

One Serve instance on a free loopback port with two applications of a seeded random model registered the way
`make train` does (conftest.register_random_model):
- ``main`` at ``/``: no auth, loaded by its registry alias, so the page shows a run id and a registry version;
- ``locked`` at ``/locked``: bearer auth (the page must ask for the key, and the page itself stays open).

The browser is Debian's ``chromium`` driven through ``chromium-driver`` with selenium (nothing is downloaded).
Every wait is explicit and bounded; the module takes about 20-30 s on 2 busy cores, most of it Serve starting.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lmplatform.config import ServeConfig, load_platform_config
from lmplatform.serve import ServerSettings, build_app

from lm.tokenizer import train_tokenizer
from tests.integration.conftest import TINY, free_port, register_random_model

pytestmark = pytest.mark.ray

API_KEY = "playground-key-0123"
MAX_NEW = 20000  # the main app's limit: a generation that long is still running when the test presses Stop
NAME = "lmlab-itest"
WAIT_S = 20.0  # the longest any one wait may take


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, small_text: str) -> dict[str, Any]:
    """A random toy model registered as version 1 of lmlab-itest (alias best) in a fresh MLflow store."""
    root = tmp_path_factory.mktemp("playground")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [
        *TINY,
        f"data.corpus={corpus_dir / 'corpus.txt'}",
        f"data.cache_dir={corpus_dir / 'data'}",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
    ]
    cfg, pcfg = load_platform_config(None, overrides, base_dir=root)
    tokenizer = train_tokenizer([small_text], vocab_size=300).save(root / "tokenizer.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracker, best = register_random_model(cfg, pcfg, root / "run", tokenizer, seed=7)
    return {"uri": uri, "checkpoint": str(best), "run_id": tracker.run_id}


@pytest.fixture(scope="module")
def server(ray_cluster: None, registered: dict[str, Any]) -> Iterator[str]:
    """Serve on a free loopback port with the open and the locked app; yields the base URL."""
    from ray import serve

    def settings(ref: str | None, api_key: str | None) -> ServerSettings:
        cfg = ServeConfig(num_cpus=0.1, threads=1, max_new_tokens=MAX_NEW, max_batch_size=4)
        return ServerSettings(cfg, ref, registered["uri"], "itest", api_key)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(settings(None, None)), name="main", route_prefix="/", blocking=False)
        locked = build_app(settings(registered["checkpoint"], API_KEY))
        serve.run(locked, name="locked", route_prefix="/locked", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _chromium() -> tuple[str, str]:
    """Chromium and chromedriver from the PATH; a machine without them fails (never skips), saying what to install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver_path)) if not p)
        pytest.fail(
            f"the playground's browser tests need {missing} on the PATH: install the Debian packages "
            "`chromium chromium-driver` (apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    return chromium, driver_path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (selenium; nothing downloaded)."""
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL"}
    )  # console messages, CSP violations included
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], Any], browser: Any = None, timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds (with
    the browser's console, where a blocked script or a failed request shows)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = ""
            if browser is not None:  # what the page says: its status, its error line, the browser's console
                console = [e["message"] for e in browser.get_log("browser")]
                seen = f"; status {_text(browser, 'status')!r}, error {_text(browser, 'error')!r}, console {console}"
            pytest.fail(f"waited {timeout:.0f} s for {what}{seen}")
        time.sleep(0.05)


def _text(browser: Any, element_id: str) -> str:
    return browser.find_element("id", element_id).text


def _visible(browser: Any, element_id: str) -> bool:
    return browser.find_element("id", element_id).is_displayed()


def _set(browser: Any, element_id: str, value: str) -> None:
    box = browser.find_element("id", element_id)
    box.clear()
    box.send_keys(value)


def _open(browser: Any, url: str) -> None:
    """Load the page in a fresh tab state (no key kept from an earlier test) and wait for its first request."""
    browser.get(url)
    browser.execute_script("sessionStorage.clear()")
    browser.get(url)
    _until(
        "the page to describe the model or ask for a key",
        lambda: "loading" not in _text(browser, "model-info"),
        browser,
    )


def _wait_status(browser: Any, prefix: str) -> str:
    """The page's status line once it starts with ``prefix`` ("done", "stopped")."""
    return _until(
        f"the status {prefix!r}", lambda: (s := _text(browser, "status")).startswith(prefix) and s, browser
    )


def _engine(http: httpx.Client) -> dict[str, float]:
    return http.get("/v1/model").json()["serving"]["engine"]


def _csp_violations(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_a_machine_without_chromium_fails_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/chromium" if name == "chromium" else None)
    with pytest.raises(
        pytest.fail.Exception, match=r"need chromedriver on the PATH: .*`chromium chromium-driver`"
    ):
        _chromium()


# --------------------------------------------------------------------------------------------------------------
# Over HTTP: what the page is, and that it is open while the API stays locked


def test_page_is_open_self_contained_and_locked_down(http: httpx.Client) -> None:
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # self-contained: nothing fetched from anywhere but this origin (no CDN), no inline secret
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), (
        "the page loads something from elsewhere"
    )
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]{44}'$", csp.split(";")[1].strip())
    assert r.headers["x-content-type-options"] == "nosniff"

    for path in ("/locked", "/locked/"):  # the page stays open on an app with auth on, and holds no key
        page = http.get(path, follow_redirects=True)  # /locked: Starlette redirects to /locked/
        assert page.status_code == 200 and page.text == html and API_KEY not in page.text
        assert page.url.path == "/locked/"
    refused = http.get("/locked/v1/model")  # ... while everything it calls still wants the key
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/locked/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------------------
# In the browser


def test_generate_streams_text_and_shows_the_model(
    browser: Any, server: str, http: httpx.Client, registered: dict[str, Any]
) -> None:
    _open(browser, server + "/")
    info = _text(browser, "model-info")
    # run id, registry version, perplexity and bits per byte from GET /v1/model (FINISHED_METRICS: val 30.125, 2.5)
    assert f"model {NAME}" in info and f"run {registered['run_id']}" in info
    assert f"registry version {NAME} v1" in info
    assert "val perplexity 30.13" in info and "val bits per byte 2.500" in info  # JS rounds 30.125 up
    # the knobs start at the checkpoint's sample: settings, the max tokens slider ends at serve.max_new_tokens
    slider = browser.find_element("id", "max-tokens-range")
    assert slider.get_attribute("max") == str(MAX_NEW) and slider.get_attribute("value") == "16"

    _set(browser, "prompt", "ROMEO:")
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", "12")
    browser.find_element("id", "generate").click()
    status = _wait_status(browser, "done")
    assert re.match(r"done \((eos|length)\): \d+ tokens in", status)
    assert not _visible(browser, "error")
    shown = browser.find_element("id", "out-text").get_attribute("textContent")
    # the page shows exactly what the API generates for the same greedy request
    expected = http.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_tokens": 12, "temperature": 0})
    assert shown == expected.json()["text"] and shown
    assert browser.find_element("id", "out-prompt").get_attribute("textContent") == "ROMEO:"
    assert _csp_violations(browser) == []  # the policy lets the page's own script and style run, nothing else


def test_stop_aborts_the_stream_and_frees_the_row(browser: Any, server: str, http: httpx.Client) -> None:
    _open(browser, server + "/")
    before = _engine(http)
    _set(browser, "temperature", "1")
    _set(browser, "max-tokens", str(MAX_NEW))
    _set(browser, "seed", "1")
    browser.find_element("id", "generate").click()
    _until(
        "streamed text", lambda: browser.find_element("id", "out-text").get_attribute("textContent"), browser
    )
    # text on the page while the server is still decoding: it streams in, not all at once at the end
    assert _engine(http)["running"] == 1 and browser.find_element("id", "stop").is_enabled()
    assert _text(browser, "status").startswith("generating")
    browser.find_element("id", "stop").click()
    status = _wait_status(browser, "stopped")
    assert re.match(r"stopped after \d+ tokens", status)
    assert browser.find_element("id", "stop").get_attribute("disabled") == "true"
    assert browser.find_element("id", "generate").is_enabled()
    # the fetch's abort closed the connection: the server cancels the request and frees its row
    after = _until(
        "the server to free the row",
        lambda: (
            (e := _engine(http))["running"] == 0
            and e["requests_cancelled"] > before["requests_cancelled"]
            and e
        ),
    )
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1 and after["waiting"] == 0
    time.sleep(0.3)
    tokens = _engine(http)["tokens_generated"]
    assert (
        tokens == after["tokens_generated"] and tokens - before["tokens_generated"] < MAX_NEW
    )  # cut, not run out
    assert "lmlab_running_requests 0.0" in http.get("/metrics").text


def test_api_errors_show_the_apis_message(browser: Any, server: str) -> None:
    _open(browser, server + "/")
    _set(browser, "max-tokens", str(MAX_NEW + 1))  # the number box goes past the slider: the API says no
    browser.find_element("id", "generate").click()
    _until("the error", lambda: _visible(browser, "error"), browser)
    message = _text(browser, "error")
    assert (
        message
        == f"400: max_new_tokens={MAX_NEW + 1} is too large: it must be <= {MAX_NEW} (serve.max_new_tokens)"
    )
    assert (
        _text(browser, "status") == "refused by the server"
        and browser.find_element("id", "generate").is_enabled()
    )

    _set(browser, "max-tokens", "4")
    _set(browser, "seed", "-3")  # refused by the page before it asks the server
    browser.find_element("id", "generate").click()
    assert _text(browser, "error").startswith("seed must be a whole number from 0 to 9007199254740991")


def test_model_text_is_shown_as_text_never_markup(browser: Any, server: str) -> None:
    """The random toy model cannot be made to write ``<script>``, so the page's own rendering function, the one
    every streamed event goes through, is called in the browser with markup; the prompt, which is echoed above
    the output, goes through a real generation."""
    _open(browser, server + "/")
    prompt = "<b>b</b><script>x</script>"  # short: the toy's prompts hold at most 32 tokens
    _set(browser, "prompt", prompt)
    _set(browser, "max-tokens", "3")
    browser.find_element("id", "generate").click()
    _wait_status(browser, "done")
    attack = '<script>window.__owned = 1</script><img src=x onerror="window.__owned = 2"><b>bold</b>'
    browser.execute_script("appendOutput(arguments[0])", attack)
    output = browser.find_element("id", "output")
    assert output.find_elements("css selector", "script, img, b") == []
    assert browser.find_element("id", "out-prompt").get_attribute("textContent") == prompt
    assert browser.find_element("id", "out-text").get_attribute("textContent").endswith(attack)
    assert attack in output.text  # shown as characters on the page
    assert browser.execute_script("return window.__owned") is None


def test_auth_on_the_page_asks_for_the_key(browser: Any, server: str) -> None:
    _open(browser, server + "/locked")  # redirected to /locked/, where the page finds the API under /locked
    assert _visible(browser, "auth") and _text(browser, "model-info") == "this server wants an API key"
    assert not browser.find_element("id", "generate").is_enabled()

    _set(browser, "api-key", "wrong-key-xxxxxxxx")
    browser.find_element("id", "auth-submit").click()
    _until("the refusal", lambda: _visible(browser, "auth-error"), browser)
    assert _text(browser, "auth-error").startswith("missing or wrong API key")
    assert (
        browser.execute_script("return sessionStorage.getItem('lmlab.apiKey')") is None
    )  # a refused key is dropped

    _set(browser, "api-key", API_KEY)
    browser.find_element("id", "auth-submit").click()
    _until("the model's description", lambda: _text(browser, "model-info").startswith("model itest"), browser)
    assert not _visible(browser, "auth")
    _set(browser, "max-tokens", "5")
    browser.find_element("id", "generate").click()  # sends the key as a bearer header, or the server says 401
    _wait_status(browser, "done")
    assert browser.find_element("id", "out-text").get_attribute("textContent")
    assert API_KEY not in browser.page_source  # kept in sessionStorage, never put into the document

    browser.refresh()  # the same tab keeps the key for its session
    _until("the model's description", lambda: _text(browser, "model-info").startswith("model itest"), browser)
    assert not _visible(browser, "auth")
