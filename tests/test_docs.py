"""
Every YAML and JSON example in README.md and docs/ is a configuration fauth
accepts: whole documents as they are, a C{forward-auth} object, a route or
an upstream inside the smallest document that holds it.  The bodies of the
admin API's C{PUT} and C{POST} examples (C{curl ... -d '{...}'}) count too;
one that elides with C{...} is not an object to check.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from fauth import parse_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"(?ms)^```(yaml|json)\n(.*?)^```")
_SHELL = re.compile(r"(?ms)^```sh\n(.*?)^```")
_ADMIN_WRITE = re.compile(r"curl -X (?:PUT|POST) \S+/apisix/admin/\S+ .*?-d '(.*?)'", re.S)
_NODES = {"127.0.0.1:1980": 1}


def _examples() -> List[Tuple[str, str, str]]:
    found = []
    pages = ["README.md"] + sorted(
        os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True)
    )
    for page in pages:
        with open(os.path.join(REPO_ROOT, page)) as f:
            text = f.read()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(("%s:%d" % (page, line), match.group(1), match.group(2)))
        for shell in _SHELL.finditer(text):
            for write in _ADMIN_WRITE.finditer(shell.group(1)):
                if "..." in write.group(1):
                    continue
                line = text.count("\n", 0, shell.start(1) + write.start()) + 1
                found.append(("%s:%d" % (page, line), "json", write.group(1)))
    return found


def _document(example: Dict[str, Any]) -> Dict[str, Any]:
    """The smallest whole configuration that holds C{example}."""
    if "forward-auth" in example:
        return {"routes": [{"id": "doc", "uri": "/*", "plugins": example, "upstream": {"nodes": _NODES}}]}
    if "uri" in example or "uris" in example:
        route = dict(example)
        route.setdefault("id", "doc")
        if "upstream_id" in route:
            return {"routes": [route], "upstreams": [{"id": route["upstream_id"], "nodes": _NODES}]}
        route.setdefault("upstream", {"nodes": _NODES})
        return {"routes": [route]}
    if "nodes" in example:
        return {"upstreams": [dict(example, id=example.get("id", "doc"))]}
    return example


EXAMPLES = _examples()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("where,language,text", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_is_accepted(where: str, language: str, text: str, monkeypatch: Any, tmp_path: Any) -> None:
    # The examples name secrets by environment variable and files by relative path.
    monkeypatch.setenv("FAUTH_ADMIN_KEY", "doc-key")
    monkeypatch.setenv("ETCD_PASSWORD", "doc-password")
    monkeypatch.chdir(tmp_path)
    example = json.loads(text) if language == "json" else yaml.safe_load(text)
    assert isinstance(example, dict), where
    parse_config(_document(example))
