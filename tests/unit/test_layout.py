"""The repository layout promises: `platform` stays the standard library; lm never imports ray or mlflow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_platform_is_still_the_standard_library_from_the_repo_root() -> None:
    code = "import platform, torch; print(platform.__file__); print(platform.system())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "lmplatform" not in out[0] and not out[0].startswith(str(REPO / "platform"))
    assert out[1] in ("Linux", "Darwin", "Windows")
    assert not (REPO / "platform" / "__init__.py").exists()


def test_lm_source_never_imports_ray_or_mlflow() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(ray|mlflow)\b", re.MULTILINE)
    offenders = [p.name for p in (REPO / "lm").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_importing_every_lm_module_loads_neither_ray_nor_mlflow() -> None:
    modules = sorted(p.stem for p in (REPO / "lm").glob("*.py") if p.stem not in ("__main__",))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module('lm.' + m if m != '__init__' else 'lm')\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
