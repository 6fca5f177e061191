"""Shared test configuration. The ``kube`` and ``softhsm_token`` fixtures come from the
``kustody`` pytest plugin (``kustody.testing.plugin``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO
