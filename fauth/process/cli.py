# -*- test-case-name: tests.process.test_cli -*-
"""
The C{fauth} command (and C{python -m fauth}): C{twistd -n fauth} in the
foreground without a pid file, with the same options (C{--config},
C{--workers}, C{--check}, C{--version}).
"""
from __future__ import annotations

import sys
from typing import List, Optional

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> None:
    """Run C{twistd -n --pidfile= fauth ARGV...}; exits as twistd does."""
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["fauth", "--nodaemon", "--pidfile=", "fauth"] + list(args)
    run()
