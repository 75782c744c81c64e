#!/usr/bin/env python3
"""
What metrics and the access log cost per request.

    python scripts/bench_metrics.py micro [--n 200000]
        In-process: the per-request code metrics add (an Exchange through
        routed, auth, upstream and finish, with the notifyFinish Deferred),
        and the access-log line, timed in a loop (CPU time per request).

    python scripts/bench_metrics.py wrk [--duration 10] [--connections 16] [--rounds 3]
        A gateway process (pinned to CPU 0) in front of the demo auth
        service and echo upstream (another process), loaded with wrk
        (pinned to CPU 1) on the allow path, in three modes: metrics off,
        metrics on (the default), metrics on plus an access log file.
        Reports the gateway's CPU time (user + system, from /proc) per
        request, which depends much less on other load than req/s.

Run from the repo root with the interpreter whose cost you want to know
(e.g. /work/venv/bin/python, or a PyPy venv's python).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# --- micro -------------------------------------------------------------------------


def micro(n: int) -> None:
    from twisted.internet.defer import Deferred
    from twisted.web.http_headers import Headers

    from fauth.observe.accesslog import AccessLog
    from fauth.auth.decision import Allow
    from fauth.observe.exchange import Exchange
    from fauth.observe.metrics import GatewayMetrics

    class Request:
        __slots__ = ("code", "startedWriting", "method", "uri", "sentLength", "_d")

        def __init__(self) -> None:
            self.code = 200
            self.startedWriting = 1
            self.method = b"GET"
            self.uri = b"/headers?a=1"
            self.sentLength = 312

        def notifyFinish(self) -> Deferred:
            self._d = Deferred()
            return self._d

        def getClientAddress(self) -> Any:
            return _ADDRESS

    _ADDRESS = types.SimpleNamespace(host="127.0.0.1", port=50000)
    gateway = types.SimpleNamespace(conf=types.SimpleNamespace(routes=()))
    metrics = GatewayMetrics(gateway)  # type: ignore[arg-type]
    allow = Allow(((b"X-User-ID", (b"i-am-user",)),), Headers({b"x-user-id": [b"i-am-user"]}))

    def one() -> None:
        request = Request()
        exchange = Exchange(metrics, request)
        exchange.routed("1")
        exchange.auth_started()
        exchange.decided(allow)
        exchange.upstream_started()
        exchange.upstream_answered()
        request._d.callback(None)

    def baseline() -> None:
        # What the request path pays anyway for the same objects, minus metrics.
        request = Request()
        request.notifyFinish()
        request._d.callback(None)

    def run(f: Any) -> float:
        for _ in range(min(n, 20000)):  # warm-up (PyPy's JIT)
            f()
        start = time.process_time()
        for _ in range(n):
            f()
        return (time.process_time() - start) / n * 1e6

    base = run(baseline)
    with_metrics = run(one)
    tmp = tempfile.mkdtemp()
    try:
        metrics.access_log = AccessLog(os.path.join(tmp, "access.log"))
        with_log = run(one)
        metrics.access_log.close()
    finally:
        shutil.rmtree(tmp)
    print("%s %s, %d iterations" % (sys.implementation.name, sys.version.split()[0], n))
    print("  stub request + notifyFinish (not metrics)    %6.2f us" % base)
    print("  metrics per request (Exchange, counters, 2 histograms)  %6.2f us" % (with_metrics - base))
    print("  metrics + access log line (file, buffered)  %6.2f us" % (with_log - base))


# --- wrk ---------------------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def wait_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nothing listening on %d" % port)


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(config: str, mode: str) -> None:
    """The gateway process of the wrk mode."""
    from twisted.internet import reactor

    from fauth.process.service import GatewayService

    service = GatewayService.from_file(config, reactor)
    if mode == "off":
        service.resource._metrics = None
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def run_wrk(args: argparse.Namespace) -> None:
    import yaml

    tmp = tempfile.mkdtemp()
    procs: List[subprocess.Popen] = []
    try:
        auth_port, echo_port = free_port(), free_port()
        backends = os.path.join(tmp, "backends.yaml")
        with open(backends, "w") as f:
            yaml.safe_dump(
                {
                    "listen": ["tcp:%d:interface=127.0.0.1" % free_port()],
                    "demo": {
                        "auth": "tcp:%d:interface=127.0.0.1" % auth_port,
                        "upstream": "tcp:%d:interface=127.0.0.1" % echo_port,
                    },
                },
                f,
            )
        procs.append(
            subprocess.Popen(
                ["taskset", "-c", "1", sys.executable, "-m", "twisted", "fauth", "--config", backends],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(auth_port)
        wait_port(echo_port)
        results: Dict[str, List[Tuple[float, float]]] = {}
        modes = ["off", "on", "log"]
        for round_ in range(args.rounds):
            for mode in modes:
                port = free_port()
                config = os.path.join(tmp, "gateway-%s.yaml" % mode)
                doc: Dict[str, Any] = {
                    "listen": ["tcp:%d:interface=127.0.0.1" % port],
                    "routes": [
                        {
                            "id": "1",
                            "uri": "/headers",
                            "plugins": {
                                "forward-auth": {
                                    "uri": "http://127.0.0.1:%d/" % auth_port,
                                    "request_headers": ["Authorization"],
                                    "upstream_headers": ["X-User-ID"],
                                    "keepalive_pool": 64,
                                }
                            },
                            "upstream": {"nodes": {"127.0.0.1:%d" % echo_port: 1}},
                        }
                    ],
                }
                if mode == "log":
                    doc["access_log"] = os.path.join(tmp, "access.log")
                with open(config, "w") as f:
                    yaml.safe_dump(doc, f)
                gateway = subprocess.Popen(
                    ["taskset", "-c", "0", sys.executable, __file__, "serve", config, mode],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(gateway)
                wait_port(port)
                wrk = [
                    "taskset", "-c", "1", "wrk", "-t1", "-c%d" % args.connections,
                    "-H", "Authorization: 321", "http://127.0.0.1:%d/headers" % port,
                ]
                subprocess.run(wrk + ["-d%ds" % args.warmup], check=True, capture_output=True)
                before = cpu_seconds(gateway.pid)
                out = subprocess.run(wrk + ["-d%ds" % args.duration], check=True, capture_output=True, text=True).stdout
                used = cpu_seconds(gateway.pid) - before
                requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
                if "Non-2xx" in out:
                    raise SystemExit("non-2xx answers in mode %s:\n%s" % (mode, out))
                results.setdefault(mode, []).append((used / requests * 1e6, rps))
                print("round %d %-3s  %7.1f us CPU/request  %7.0f req/s" % (round_ + 1, mode, used / requests * 1e6, rps), flush=True)
                gateway.send_signal(signal.SIGINT)
                gateway.wait(10)
                procs.remove(gateway)
        print("\n%s %s, median of %d rounds:" % (sys.implementation.name, sys.version.split()[0], args.rounds))
        medians = {m: sorted(r[0] for r in results[m])[len(results[m]) // 2] for m in modes}
        for mode in modes:
            extra = "" if mode == "off" else "  (%+.1f us, %+.1f%%)" % (
                medians[mode] - medians["off"], (medians[mode] / medians["off"] - 1) * 100
            )
            print("  %-4s %7.1f us CPU/request%s" % (mode, medians[mode], extra))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--n", type=int, default=200000)
    w = sub.add_parser("wrk")
    w.add_argument("--duration", type=int, default=10)
    w.add_argument("--warmup", type=int, default=3)
    w.add_argument("--connections", type=int, default=16)
    w.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("serve")
    s.add_argument("config")
    s.add_argument("mode", choices=["off", "on", "log"])
    args = parser.parse_args()
    if args.cmd == "micro":
        micro(args.n)
    elif args.cmd == "wrk":
        run_wrk(args)
    else:
        serve(args.config, args.mode)


if __name__ == "__main__":
    main()
