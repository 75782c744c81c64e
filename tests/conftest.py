"""Fixtures every test package shares."""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def reactor() -> Any:
    """The global reactor (pytest-twisted runs it), imported only when a test asks."""
    from twisted.internet import reactor

    return reactor
