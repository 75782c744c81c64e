# -*- test-case-name: tests.process.test_gcsettings -*-
"""
The garbage collector of a process that is all gateway.

CPython's cyclic collector scans every tracked object in the oldest
generation now and then: in a gateway that is Twisted, treq, the route
table and the modules, several hundred thousand objects that live as long
as the process, scanned in one pause while requests wait (the slow tail of
the latency).  Freezing what exists once the gateway is built moves those
objects out of the collector's sight for good; a larger first threshold
lets the short-lived objects of a request (most are freed by reference
counting before any collection) die before they are scanned at all.
Not applied to an embedding application: the process is theirs.
"""
from __future__ import annotations

import gc

__all__ = ["settle_heap"]

# Allocations between two collections of the youngest generation (CPython's
# default is 700, a few requests' worth).
YOUNG_THRESHOLD = 20000


def settle_heap() -> None:
    """Collect once, freeze what survives, and collect the young less often."""
    gc.collect()
    freeze = getattr(gc, "freeze", None)  # CPython 3.7+; PyPy's collector is generational already
    if freeze is not None:
        freeze()
        young, middle, old = gc.get_threshold()
        gc.set_threshold(max(YOUNG_THRESHOLD, young), middle, old)
