"""
The speed floor of fauth's shape, as a `bench/run` gateway (`twisted-floor`):
a Twisted Web Site with one leaf resource whose two legs (auth, then
upstream) go over minimal persistent HTTP/1.1 client connections.  No treq,
no Agent, no HTTPConnectionPool, no validation.  It is not a gateway (it
trusts every byte it reads); it is the most twisted.web plus two client round
trips do per core, so the benchmark can say how far fauth is from it in the
same run.  A reference, not product code: adapted from the shared
bench/floor.py to bench/run's mocks (nginx answers with Content-Length; the
auth path is `/`; the upstream's `X-Upstream-Saw-User` answer header is
relayed, as bench/run's check requires).

    python floor.py LISTEN_PORT AUTH_PORT UPSTREAM_PORT [AUTH_PATH]

Auth and upstream on 127.0.0.1.  2xx from auth -> GET the same target
upstream with X-User-ID copied; anything else -> that status, empty body.
"""
import sys

from twisted.internet import defer, protocol, reactor
from twisted.web import resource, server


def field(head, name):
    """The value of header `name` (lower-case, with its colon) in a raw head, or b""."""
    i = head.lower().find(b"\r\n" + name)
    return head[i + 2 + len(name):].split(b"\r\n", 1)[0].strip() if i >= 0 else b""


class Leg(protocol.Protocol):
    """One persistent client connection; one exchange at a time."""

    def connectionMade(self):
        self.buf = b""
        self.waiting = None
        self.factory.idle.append(self)

    def ask(self, data):
        self.waiting = defer.Deferred()
        self.transport.write(data)
        return self.waiting

    def dataReceived(self, data):
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        length = field(head, b"content-length:")
        n = int(length) if length else 0
        if len(self.buf) < end + 4 + n:
            return
        body, self.buf = self.buf[end + 4:end + 4 + n], self.buf[end + 4 + n:]
        d, self.waiting = self.waiting, None
        self.factory.idle.append(self)
        d.callback((head, body))

    def connectionLost(self, reason):
        if self in self.factory.idle:
            self.factory.idle.remove(self)


class Legs(protocol.ClientFactory):
    protocol = Leg

    def __init__(self, port, size=64):
        self.port, self.idle = port, []
        for _ in range(size):
            reactor.connectTCP("127.0.0.1", port, self)

    def take(self):
        if self.idle:
            return self.idle.pop()
        reactor.connectTCP("127.0.0.1", self.port, self)  # grow; this request gets 503
        return None


class Gate(resource.Resource):
    isLeaf = True

    def __init__(self, auth, upstream, auth_path):
        resource.Resource.__init__(self)
        self.auth, self.upstream, self.auth_path = auth, upstream, auth_path

    def render(self, request):
        leg = self.auth.take()
        if leg is None:
            request.setResponseCode(503)
            return b""
        authz = request.getHeader(b"authorization") or b""
        leg.ask(b"GET " + self.auth_path + b" HTTP/1.1\r\nHost: auth\r\nAuthorization: " + authz + b"\r\n\r\n"
                ).addCallback(self.decided, request)
        return server.NOT_DONE_YET

    def decided(self, answer, request):
        head, _ = answer
        status = int(head[9:12])
        if not 200 <= status < 300:
            request.setResponseCode(status)
            request.finish()
            return
        user = field(head, b"x-user-id:")
        leg = self.upstream.take()
        if leg is None:
            request.setResponseCode(503)
            request.finish()
            return
        leg.ask(b"GET " + request.uri + b" HTTP/1.1\r\nHost: upstream\r\nX-User-ID: " + user + b"\r\n\r\n"
                ).addCallback(self.answered, request)

    def answered(self, answer, request):
        head, body = answer
        request.setResponseCode(int(head[9:12]))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-upstream-saw-user", field(head, b"x-upstream-saw-user:"))
        if not request._disconnected:
            request.write(body)
            request.finish()


def main(argv):
    listen, auth, upstream = (int(a) for a in argv[1:4])
    auth_path = (argv[4] if len(argv) > 4 else "/").encode()
    site = server.Site(Gate(Legs(auth), Legs(upstream), auth_path))
    site.noisy = False
    site.log = lambda request: None
    reactor.listenTCP(listen, site, interface="127.0.0.1", backlog=4096)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
