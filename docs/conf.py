"""Sphinx configuration: MyST Markdown pages, built with warnings as errors by scripts/test."""
from __future__ import annotations

import os
import sys

# The docs describe the working tree's fauth, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fauth  # noqa: E402

project = "fauth"
release = version = fauth.__version__
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# "#decision-cache"-style links to headings, within a page and across pages.
myst_heading_anchors = 3
html_theme = "alabaster"
html_static_path: list = []
