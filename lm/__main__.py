"""``python -m lm`` is the ``lm`` command."""

from lm.cli import main

raise SystemExit(main())
