"""pyproject.toml and the Makefile: what `make setup` builds and prints."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


def test_wheel_and_sdist_ship_the_package_data(tmp_path: Path) -> None:
    # what an install from a wheel or an sdist needs beside the code: the bundled corpus and the playground page
    # (GET / of lm serve). Built with the build backend itself from a copy of the sources (no build/ left here).
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("lm", "platform"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = "from setuptools import build_meta as b; b.build_wheel('dist'); b.build_sdist('dist')"
    out = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel_path,), (sdist_path,) = (src / "dist").glob("*.whl"), (src / "dist").glob("*.tar.gz")
    with zipfile.ZipFile(wheel_path) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(sdist_path) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for data in ("lmplatform/playground.html", "lm/corpora/tinyshakespeare.txt.gz"):
        assert data in in_wheel, f"{data} is missing from the wheel"
        in_tree = f"platform/{data}" if data.startswith("lmplatform/") else data
        assert in_tree in in_sdist, f"{in_tree} is missing from the sdist"
