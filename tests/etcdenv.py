"""
A real etcd (Debian's C{etcd-server}) for tests: one member or a cluster,
started on loopback ports with a temporary data directory, stopped and
started again on the same directory and ports.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from typing import Any, Dict, List, Optional

import attr

from tests.adminenv import free_ports

__all__ = ["ETCD", "ETCDCTL", "EtcdMember", "EtcdCluster", "etcd_put", "etcd_get"]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


@attr.s(auto_attribs=True)
class EtcdMember:
    """One etcd process: its name, ports, data directory, log."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    initial_cluster: str = ""
    process: Optional["subprocess.Popen[bytes]"] = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.client_port

    def start(self, state: str = "new") -> None:
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", "http://127.0.0.1:%d" % self.peer_port,
            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % self.peer_port,
            "--initial-cluster", self.initial_cluster or "%s=http://127.0.0.1:%d" % (self.name, self.peer_port),
            "--initial-cluster-state", state,
            "--initial-cluster-token", "fauth-test",
            # Fast elections on loopback: a lost member is noticed in a second.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "warn",
        ]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=0.5) as answer:
                return json.loads(answer.read()).get("health") == "true"
        except Exception:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@attr.s(auto_attribs=True)
class EtcdCluster:
    members: List[EtcdMember]

    @property
    def urls(self) -> List[str]:
        return [m.url for m in self.members]

    @property
    def url(self) -> str:
        return self.members[0].url

    def wait_healthy(self, seconds: float = 20.0, members: Optional[List[EtcdMember]] = None) -> None:
        deadline = time.monotonic() + seconds
        for member in members or self.members:
            while not member.healthy():
                if member.process is None or member.process.poll() is not None:
                    raise AssertionError("etcd %s exited: %s" % (member.name, member.log()))
                if time.monotonic() > deadline:
                    raise AssertionError("etcd %s not healthy: %s" % (member.name, member.log()))
                time.sleep(0.05)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def start_cluster(tmp_path: Any, size: int = 1) -> EtcdCluster:
    """C{size} members on loopback, started and healthy."""
    ports = free_ports(2 * size)
    members = []
    for n in range(size):
        name = "m%d" % n
        members.append(
            EtcdMember(
                name,
                ports[2 * n],
                ports[2 * n + 1],
                str(tmp_path / ("etcd-" + name)),
                str(tmp_path / ("etcd-%s.log" % name)),
            )
        )
    initial = ",".join("%s=http://127.0.0.1:%d" % (m.name, m.peer_port) for m in members)
    for member in members:
        member.initial_cluster = initial
        member.start()
    cluster = EtcdCluster(members)
    try:
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _call(url: str, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


def etcd_put(url: str, key: str, value: Any) -> int:
    """Write C{key} (C{value} as JSON unless bytes) as C{etcdctl put} would; the new revision."""
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    doc = _call(
        url, "/v3/kv/put", {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(raw).decode()}
    )
    return int(doc["header"]["revision"])


def etcd_get(url: str, key: str) -> Optional[Any]:
    doc = _call(url, "/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()})
    kvs = doc.get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def etcdctl(url: str, *args: str) -> str:
    """Run C{etcdctl} (v3 API) against C{url}; its output."""
    result = subprocess.run(
        [ETCDCTL, "--endpoints", url] + list(args),
        env=dict(os.environ, ETCDCTL_API="3"),
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
