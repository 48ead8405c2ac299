"""A screenshot of the playground page (GET / of a running `lm serve`) for the README, after a real generation.

    make serve            # or: lm serve experiments/serve.yaml serve.port=8000
    .venv/bin/python docs/playground_screenshot.py [--url http://127.0.0.1:8000/] [--out docs/img/playground.png]

Drives Debian's ``chromium`` through ``chromium-driver`` with selenium: types the prompt, sets the knobs, presses
Generate, waits until the streamed completion is done and saves the window. With auth on, pass the key in
``$LMLAB_API_KEY``: it is typed into the page's key form, never put into the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Open the page, generate once, save the screenshot; 1 when the page does not finish in time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "playground.png")
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--temperature", default="0.8")
    parser.add_argument("--top-k", default="40")
    parser.add_argument("--max-tokens", default="200")
    parser.add_argument("--seed", default="7")
    parser.add_argument("--size", default="1280,860", help="window width,height")
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={args.size}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    )
    try:
        driver.get(args.url)
        text = lambda element_id: driver.find_element("id", element_id).text  # noqa: E731
        deadline = time.monotonic() + 30
        while "loading" in text("model-info") and time.monotonic() < deadline:
            time.sleep(0.1)
        if driver.find_element("id", "auth").is_displayed():
            key = os.environ.get("LMLAB_API_KEY")
            if not key:
                print("the server wants an API key: set LMLAB_API_KEY", file=sys.stderr)
                return 1
            driver.find_element("id", "api-key").send_keys(key)
            driver.find_element("id", "auth-submit").click()
            while not text("model-info").startswith("model ") and time.monotonic() < deadline:
                time.sleep(0.1)
        for element_id, value in (
            ("prompt", args.prompt), ("temperature", args.temperature), ("top-k", args.top_k),
            ("max-tokens", args.max_tokens), ("seed", args.seed),
        ):  # fmt: skip
            box = driver.find_element("id", element_id)
            box.clear()
            box.send_keys(value)
        driver.find_element("id", "generate").click()
        deadline = time.monotonic() + 120
        while not text("status").startswith("done") and time.monotonic() < deadline:
            time.sleep(0.1)
        if not text("status").startswith("done"):
            print(
                f"no finished generation: status {text('status')!r}, error {text('error')!r}", file=sys.stderr
            )
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"{args.out}: {text('model-info')}; {text('status')}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
