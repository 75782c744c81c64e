"""
The configuration reference is generated from what the parsers accept, and
the committed page is what the generator makes now.
"""
from __future__ import annotations

import os

import attr
import pytest

from fauth.config import reference
from fauth.config.reference import ReferenceDrift, render

PAGE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operators", "reference.md")


def test_the_committed_page_is_the_generated_one() -> None:
    with open(PAGE) as f:
        committed = f.read()
    assert committed == render(), "run: python -m fauth.config.reference > docs/operators/reference.md"


def test_every_accepted_key_has_a_row() -> None:
    text = render()
    for section in reference._sections():
        for key in section.keys:
            assert "| `%s` |" % key in text


@pytest.mark.parametrize("change", ["accepted only", "described only"])
def test_a_key_and_its_meaning_cannot_part(change: str) -> None:
    section = next(iter(reference._sections()))
    if change == "accepted only":
        drifted = attr.evolve(section, keys=section.keys + ("brand_new",))
    else:
        drifted = attr.evolve(section, meanings=dict(section.meanings, gone="no longer read"))
    with pytest.raises(ReferenceDrift) as raised:
        drifted.rows()
    assert ("brand_new" if change == "accepted only" else "gone") in str(raised.value)


def test_defaults_come_from_the_code() -> None:
    text = render()
    from fauth.config.models import HttpLimits
    from fauth.config.schema import FORWARD_AUTH_DEFAULTS

    assert "| `timeout` | `%d` (1 to 60000) |" % FORWARD_AUTH_DEFAULTS["timeout"] in text
    assert "| `max_headers` | `%d` |" % HttpLimits().max_headers in text
