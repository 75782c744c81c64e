# -*- test-case-name: tests.config.test_document -*-
"""The one error root of a refused configuration."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration document was refused; C{str()} is one line saying where and why."""
