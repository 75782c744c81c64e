"""Fixtures every test package shares."""
from __future__ import annotations

from importlib.util import find_spec
from typing import Any, List

import pytest

# A module whose test dependency is missing (an install without the test
# extra) is not collected, rather than collected and skipped.
collect_ignore: List[str] = []
if find_spec("websockets") is None:
    collect_ignore.append("upstream/test_websocket.py")


@pytest.fixture
def reactor() -> Any:
    """The global reactor (pytest-twisted runs it), imported only when a test asks."""
    from twisted.internet import reactor

    return reactor
