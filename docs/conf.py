"""Sphinx configuration of the API reference: ``sphinx-build -W -b html docs docs/_build/html``.

Everything is built from the docstrings of the installed packages (autodoc, with napoleon for
their Google-style sections). No extension fetches anything: the build works offline (no
intersphinx), and cross-references to optax or torch stay plain text.
"""

from __future__ import annotations

import os
import sys

# The checkout's packages, when the docs are built from it without installing.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "focal-losses"
author = "the focal-losses authors"
copyright = "the focal-losses authors"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shape", "params_style"), ("References", "notes_style")]

html_theme = "alabaster"
html_title = "focal-losses"
# MathJax is referenced by URL in the pages and loaded by the reader's browser; the build
# itself fetches nothing.
