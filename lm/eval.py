"""``python -m lm.eval CHECKPOINT [--baseline gpt2]`` is ``lm eval``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``lm eval`` with these arguments."""
    from lm.cli import main as cli_main

    return cli_main(["eval", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
