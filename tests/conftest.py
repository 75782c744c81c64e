"""Fixtures every test package shares."""
from __future__ import annotations

from importlib.util import find_spec
from typing import Any, List

import pytest

# Modules whose test dependency is CPython-only (setup.cfg): not collected
# where it is not installed (PyPy), rather than collected and skipped.
collect_ignore: List[str] = []
if find_spec("websockets") is None:
    collect_ignore.append("upstream/test_websocket.py")


@pytest.fixture
def reactor() -> Any:
    """The global reactor (pytest-twisted runs it), imported only when a test asks."""
    from twisted.internet import reactor

    return reactor
