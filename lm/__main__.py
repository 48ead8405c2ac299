"""``python -m lm`` is the ``lm`` command; ``python -m lm.train`` / ``lm.eval`` / ``lm.generate`` come through here.

The library modules stay free of the CLI: their ``__main__`` blocks call :func:`run_module`, which imports
``lm.cli`` only when a module is run as a script.
"""

from __future__ import annotations

import sys

# `python -m lm.<module>` -> the `lm` subcommand it is, with the arguments put in front of the user's.
_MODULE_COMMANDS = {
    "train": ["train", "--local"],  # lm's own loop, in this process: no Ray, no MLflow
    "eval": ["eval"],
    "generate": ["generate"],
}


def run_module(name: str, argv: list[str] | None = None) -> int:
    """Run ``python -m lm.<name>`` with ``argv`` (default: ``sys.argv[1:]``): ``lm.train`` is ``lm train --local``."""
    from lm.cli import main

    if name not in _MODULE_COMMANDS:
        raise ValueError(f"no command for lm.{name}: one of {', '.join(_MODULE_COMMANDS)}")
    return main([*_MODULE_COMMANDS[name], *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lm``: lm's own CLI (no Ray, no MLflow; the ``lm`` console script adds them)."""
    from lm.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
