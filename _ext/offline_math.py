"""Serve MathJax from the build itself, so the book's maths renders with no internet.

Sphinx loads MathJax 3 from a CDN by default. We take MathJax 2.7 from the
``jupyter-server-mathjax`` package (the copy Jupyter itself serves offline), copy
it into ``_static/mathjax`` of the built site, and point ``mathjax_path`` at it.
MyST's MathJax 3 configuration is switched off and the equivalent MathJax 2
configuration set: only elements of class ``math`` (what MyST and Sphinx emit)
and notebook outputs are typeset, with the STIX-Web fonts (the only ones shipped).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jupyter_server_mathjax

MATHJAX_SOURCE = Path(jupyter_server_mathjax.__file__).parent / "static"
MATHJAX_TARGET = "mathjax"  # under _static/

# MathJax 2 spelling of what MyST configures for MathJax 3.
MATHJAX2_CONFIG = {
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processRefs": False,
        "processEnvironments": True,
        "processClass": "tex2jax_process|mathjax_process|math|output_area",
        "ignoreClass": "tex2jax_ignore|mathjax_ignore|document",
    },
    "TeX": {"extensions": ["AMSmath.js", "AMSsymbols.js"], "equationNumbers": {"autoNumber": "none"}},
    # The package ships only the STIX-Web fonts. MathJax's default (TeX fonts, then image
    # fonts) fails on the first glyph it must load from them, e.g. a prime: "[Math Processing Error]".
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None},
    "SVG": {"font": "STIX-Web"},
    "messageStyle": "none",
}


def _configure(app, config):
    config.mathjax_path = f"{MATHJAX_TARGET}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
    config.mathjax2_config = MATHJAX2_CONFIG
    config.mathjax3_config = None
    config.myst_update_mathjax = False


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / MATHJAX_TARGET
        shutil.copytree(MATHJAX_SOURCE, target, dirs_exist_ok=True)


def setup(app):
    app.connect("config-inited", _configure, priority=900)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
