"""Shared fixtures: a tiny random llama in a Hugging Face directory and an isolated model cache."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedtune-cache")


@pytest.fixture(autouse=True)
def _fedtune_logger_restored() -> Iterator[None]:
    """A test that runs the CLI attaches a handler on the stderr pytest captured for that test;
    put the "fedtune" logger back afterwards, so that a later test's log line (a worker thread's
    warning, say) is not written to a closed capture file."""
    logger = logging.getLogger("fedtune")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
