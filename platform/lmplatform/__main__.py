"""``python -m lmplatform`` is the ``lm`` command (with Ray and MLflow)."""

from lmplatform.cli import main

raise SystemExit(main())
