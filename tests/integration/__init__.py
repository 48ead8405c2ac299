"""Integration tests: real local Ray, real MLflow store (a package so module names may mirror tests/unit)."""
