# -*- test-case-name: tests.admin.test_ttl -*-
"""
C{?ttl=} for the store file: objects are deleted when their time comes, as
etcd deletes the keys of an expired lease (with etcd, etcd does it and the
watch tells every gateway).
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["StoreExpiry"]


class StoreExpiry(Service):
    """
    One timer, at the earliest expiry of a L{fauth.admin.control.Control}'s
    store, re-armed after every change; run by the process that owns the
    admin API (its changes reach the workers the way any admin change does).
    """

    def __init__(self, reactor: IReactorTime, control: Any) -> None:
        self._reactor = reactor
        self._control = control
        self._call: Optional[IDelayedCall] = None
        control.on_change(lambda conf: self._arm())

    def startService(self) -> None:
        super().startService()
        self._arm()

    def stopService(self) -> None:
        super().stopService()
        self._cancel()

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self) -> None:
        self._cancel()
        if not self.running:
            return
        delay = self._control.next_expiry()
        if delay is not None:
            self._call = self._reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._call = None
        self._control.expire()
        self._arm()
