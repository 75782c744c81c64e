"""
The private Twisted names fauth relies on.

Each exists in Twisted 25.5 (PyPy 3.9) and 26.10 (CPython 3.11).  A Twisted
upgrade that drops or renames one fails here, by
name, rather than somewhere deep in a proxy test.
"""
from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp, unix
from twisted.web import _newclient, http, server


@pytest.mark.parametrize(
    "owner, name",
    [
        # fauth.httpserver: the hardened server channel
        (http.HTTPChannel, "_maybeChooseTransferDecoder"),
        (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
        (http.HTTPChannel, "_finishRequestBody"),
        (http.HTTPChannel, "_abortingCall"),
        # fauth.resource: whether the client has gone, and GatewayRequest.process
        (http.Request, "_disconnected"),
        (server.Request, "_handleStar"),
        (http, "_ChunkedTransferDecoder"),
        (http, "_MalformedChunkedDataError"),
        (http._ChunkedTransferDecoder, "_dataReceived_CHUNK_LENGTH"),
        # fauth.connection, fauth.transport, fauth.pools: the errors a client
        # connection fails with
        (_newclient, "_DataLoss"),
        (_newclient, "ParseError"),
        (_newclient, "RequestNotSent"),
        # fauth.config, fauth.service, fauth.workers
        (endpoints, "_parseServer"),
        (StreamServerEndpointService, "_raiseSynchronously"),
        (tcp.Port, "_fromListeningDescriptor"),
        (unix.Port, "_fromListeningDescriptor"),
    ],
)
def test_private_name_exists(owner: object, name: str) -> None:
    assert hasattr(owner, name), "%s.%s is gone" % (getattr(owner, "__name__", owner), name)
