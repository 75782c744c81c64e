"""L{fauth.process.gcsettings.settle_heap}, in a fresh interpreter (it changes the process's collector)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

from fauth.process.gcsettings import YOUNG_THRESHOLD


def test_settle_heap_freezes_what_exists_and_collects_the_young_less_often() -> None:
    script = (
        "import gc, json; from fauth.process.gcsettings import settle_heap; settle_heap(); "
        "print(json.dumps([getattr(gc, 'get_freeze_count', lambda: -1)(), "
        "getattr(gc, 'get_threshold', lambda: [-1])()[0], gc.isenabled()]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, text=True).stdout
    frozen, young, enabled = json.loads(out)
    assert enabled
    if platform.python_implementation() == "CPython":
        assert frozen > 1000  # the interpreter and fauth's modules, out of the collector's sight
        assert young == YOUNG_THRESHOLD
    else:
        assert (frozen, young) == (-1, -1)  # PyPy: no freeze, no thresholds; its collector left as it is


def test_twistd_fauth_settles_the_heap_of_a_single_process(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import fauth.process.gcsettings
    from fauth.process import tap

    calls = []
    monkeypatch.setattr(fauth.process.gcsettings, "settle_heap", lambda: calls.append(True))
    config = tmp_path / "fauth.yaml"
    config.write_text(json.dumps({"listen": ["tcp:0:interface=127.0.0.1"], "routes": []}))
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    service = tap.makeService(options)
    assert calls == [True] and service is not None
