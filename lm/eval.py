"""``python -m lm.eval CHECKPOINT [--baseline gpt2]`` is ``lm eval`` (lm's own, without MLflow references)."""

from __future__ import annotations

if __name__ == "__main__":
    from lm.__main__ import run_module

    raise SystemExit(run_module("eval"))
