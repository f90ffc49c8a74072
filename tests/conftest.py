"""Shared pytest configuration.  S3 fixtures (s3_server, s3_bucket, fault_proxy) live in tests/s3_fixtures.py."""

import os
import sys

# `tests` is not an installed package: make the repo root importable for plain `pytest` runs too
# (`python -m pytest` adds the cwd by itself).  pyproject's `pythonpath = ["."]` would also do.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.s3_fixtures"]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session (start-up costs ~10 s). Started after the moto server so that
    the workers inherit its dummy AWS credentials from the environment."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300_000_000, include_dashboard=False,
             logging_level="WARNING", configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
