"""pyproject.toml and the Makefile: what `make setup` builds and prints."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_expression() -> None:
    # the old `license = {text = "MIT"}` table made setuptools print ~50 lines of deprecation banners
    text = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; we support 3.10)
    assert re.search(r'^license = "MIT"$', text, re.M)
    setuptools = re.search(r'^requires = \["setuptools>=(\d+)', text, re.M)
    assert setuptools and int(setuptools.group(1)) >= 77  # the first with SPDX license expressions


def test_make_setup_says_what_it_is_doing() -> None:
    dry = subprocess.run(
        ["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "installing lmlab and its dependencies" in dry
    assert "source .venv/bin/activate" in dry
