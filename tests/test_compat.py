"""
The private Twisted and treq names fauth relies on.

Each exists in Twisted 25.5 (PyPy 3.9) and 26.10 (CPython 3.11) and in treq
26.7.  A Twisted or treq upgrade that drops or renames one fails here, by
name, rather than somewhere deep in a proxy test.
"""
from __future__ import annotations

import inspect

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp, unix
from twisted.web import _newclient, client, http


@pytest.mark.parametrize(
    "owner, name",
    [
        # fauth.httpserver: the hardened server channel
        (http.HTTPChannel, "_maybeChooseTransferDecoder"),
        (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
        (http.HTTPChannel, "_finishRequestBody"),
        (http.HTTPChannel, "_abortingCall"),
        # fauth.resource: whether the client has gone
        (http.Request, "_disconnected"),
        (http, "_ChunkedTransferDecoder"),
        (http, "_MalformedChunkedDataError"),
        (http._ChunkedTransferDecoder, "_dataReceived_CHUNK_LENGTH"),
        # fauth.transport and fauth.authclient: the client parser and pool
        (_newclient, "HTTPClientParser"),
        (_newclient, "HTTP11ClientProtocol"),
        (_newclient, "_DataLoss"),
        (_newclient, "ParseError"),
        (client, "_HTTP11ClientFactory"),
        (client.HTTPConnectionPool, "_factory"),
        (client.HTTPConnectionPool, "_newConnection"),
        # fauth.config, fauth.service, fauth.workers
        (endpoints, "_parseServer"),
        (StreamServerEndpointService, "_raiseSynchronously"),
        (tcp.Port, "_fromListeningDescriptor"),
        (unix.Port, "_fromListeningDescriptor"),
    ],
)
def test_private_name_exists(owner: object, name: str) -> None:
    assert hasattr(owner, name), "%s.%s is gone" % (getattr(owner, "__name__", owner), name)


def test_instance_attributes_set_by_constructors() -> None:
    # Set in __init__ rather than on the class: read the source instead.
    assert "self._connections" in inspect.getsource(client.HTTPConnectionPool.__init__)
    assert "self._parser" in inspect.getsource(_newclient.HTTP11ClientProtocol.request)
    assert "connHeaders" in inspect.getsource(_newclient.HTTPClientParser)


def test_treq_response_wrapper() -> None:
    from treq.response import _Response

    assert list(inspect.signature(_Response.__init__).parameters)[1:] == ["original", "cookiejar"]
