"""
A short soak in CI: ``soak/run --duration 20 --rate 100`` against a real
gateway subprocess (about 25 s).  The full 10-minute soak is run by hand:
``soak/run`` (see its docstring).

Set FAUTH_SKIP_SOAK=1 to skip it locally.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(REPO, "soak", "run")


@pytest.mark.skipif(os.environ.get("FAUTH_SKIP_SOAK") == "1", reason="FAUTH_SKIP_SOAK=1")
def test_short_soak_has_no_wrong_decision_no_altered_body_and_flat_fds(tmp_path: Any) -> None:
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, SOAK, "--duration", "20", "--rate", "100", "--warmup", "5", "--results", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    summary_path = results / "latest.json"
    assert summary_path.exists(), output
    summary = json.loads(summary_path.read_text())
    assert summary["wrong_decisions"] == 0, summary["examples"]
    assert summary["altered_bodies"] == 0, summary["examples"]
    assert summary["errors"] == 0, summary["examples"]
    assert summary["gateway"]["log_tracebacks"] == 0, (results / "gateway.log").read_text()[-4000:]
    # Every kind ran, at about the asked rate (the machine may be shared).
    requests = summary["requests"]
    assert requests["total"] >= 1500, requests
    for kind in ("allow", "deny", "post", "fault"):
        assert requests[kind]["total"] > 0 and requests[kind]["ok"] == requests[kind]["total"], requests[kind]
    # Each auth failure was logged.
    assert summary["gateway"]["log_fault_lines"] >= requests["fault"]["total"], summary["gateway"]
    # No descriptor growth: the end (under load, and drained) is where warm-up left it.
    fds = summary["gateway"]["fds"]
    slack = summary["gateway"]["fd_slack"]
    assert fds["end"] <= fds["start"] + slack, fds
    assert fds["after_drain"] <= fds["start"] + slack, fds
    assert summary["gateway"]["fd_flat"] is True, fds
    # The chaos auth service has no connection left open (stalled ones were closed by the gateway).
    assert summary["chaos_connections_open_at_end"] == 0, summary
    assert run.returncode == 0, output
