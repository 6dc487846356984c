"""The site builds with warnings as errors, and its pages render in a real browser
with no internet: the maths is typeset by the MathJax we serve ourselves (no raw
TeX left on the page) and every figure is there. No page shows a failed cell's
traceback, and Markdown tables printed by code are rendered as tables, not pipe text.

The build uses the notebooks' committed outputs (execution off): the notebook tests
(nbval) check that those outputs are what the code produces today.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=30000", "--dump-dom",
]
# Pages whose maths and figures are checked in the browser: every chapter the toc lists
# (its "Chapters" part), so that a new chapter cannot be left out of the check.
def chapter_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "toc.yml").read_text())
    part = next(p for p in toc["parts"] if p["caption"] == "Chapters")
    return [entry["file"] + ".html" for entry in part["chapters"]]


PAGES = chapter_pages()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed for the site test: `make test` installs Debian's `chromium`")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the book once into a temporary folder, with the notebooks' committed outputs."""
    config = yaml.safe_load((ROOT / "book.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    # The copied config lives elsewhere: make the paths it holds absolute.
    config["sphinx"]["local_extensions"] = {name: str(ROOT / path) for name, path in config["sphinx"]["local_extensions"].items()}
    config["bibtex_bibfiles"] = [str(ROOT / path) for path in config["bibtex_bibfiles"]]
    config_path = tmp_path_factory.mktemp("config") / "book.yml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path_factory.mktemp("site")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    build = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--config", str(config_path), "--toc", str(ROOT / "toc.yml"),
         "--path-output", str(out), "--warningiserror", "--keep-going"],
        capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, f"the site build failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
    return out / "_build" / "html"


def render(page: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium."""
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class VisibleText(HTMLParser):
    """Text a reader sees: outside <script>, <style>, and code (<pre>, <code>), where TeX may legitimately appear."""

    HIDDEN = {"script", "style", "pre", "code"}

    def __init__(self):
        super().__init__()
        self.depth, self.chunks = 0, []

    def handle_starttag(self, tag, attrs):
        self.depth += tag in self.HIDDEN

    def handle_endtag(self, tag):
        self.depth -= tag in self.HIDDEN

    def handle_data(self, data):
        if self.depth == 0:
            self.chunks.append(data)


def visible_text(dom: str) -> str:
    parser = VisibleText()
    parser.feed(dom)
    return " ".join(parser.chunks)


@pytest.mark.parametrize("page", PAGES)
def test_maths_is_typeset_offline(site, page, tmp_path):
    html = (site / page).read_text()
    assert "mathjax/MathJax.js" in html and "cdn.jsdelivr" not in html, "MathJax must be served from the site"
    dom = render(site / page, tmp_path)
    sources = len(re.findall(r'<script type="math/tex', dom))
    rendered = len(re.findall(r'class="MathJax(?:_Display|_SVG_Display)?"', dom))
    assert sources > 10, f"{page}: expected the chapter's maths to be typeset, found {sources} formulas"
    assert rendered >= sources, f"{page}: {sources} formulas but {rendered} rendered"
    errors = re.findall(r'class="(?:MathJax_Error|merror|noError)"[^>]*>([^<]*)', dom)
    assert not errors, f"{page}: MathJax could not typeset: {errors[:5]}"
    assert "Math Processing Error" not in dom, f"{page}: MathJax failed on a formula (a font it lacks?)"
    text = visible_text(dom)
    leftovers = re.findall(r"\\\(|\\\[|\$\$|\\frac|\\mathbf|\\top|\\begin\{", text)
    assert not leftovers, f"{page}: raw TeX left on the page: {leftovers[:5]}"


def notebook_figures(page: str) -> int:
    """How many figures the page's notebook holds in its committed outputs."""
    notebook = json.loads((ROOT / page).with_suffix(".ipynb").read_text())
    return sum("image/png" in out.get("data", {}) for cell in notebook["cells"] for out in cell.get("outputs", []))


@pytest.mark.parametrize("page", PAGES)
def test_figures_are_present(site, page):
    expected = notebook_figures(page)
    assert expected >= 2, f"{page}: its notebook holds {expected} figures (committed without outputs?)"
    html = (site / page).read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    figures = [src for src in images if "_images/" in src]
    assert len(figures) >= expected, f"{page}: expected the notebook's {expected} figures, found {figures}"
    for src in figures:
        path = (site / page).parent / src
        assert path.is_file() and path.stat().st_size > 1000, f"{page}: figure {src} is missing or empty"


# myst-nb renders an error output as a code block with the IPython-traceback lexer.
ERROR_OUTPUT = re.compile(r'class="[^"]*\b(?:output traceback|highlight-ipythontb|output error)\b')
# A Markdown table left as text shows its delimiter row, |---|---| (colons allowed), to the reader;
# on the page Sphinx's smart quotes turn each --- into an em dash.
_DELIMITER = r"\s*:?(?:-{3,}|[\u2014\u2013][-\u2014\u2013]*):?\s*"
RAW_TABLE = re.compile(rf"\|{_DELIMITER}(?:\|{_DELIMITER})+\|")


def site_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and p.name not in {"genindex.html", "search.html"})


def markdown_output_tables(notebook: Path) -> int:
    """How many tables the notebook's committed text/markdown outputs hold (display(Markdown(...)))."""
    cells = json.loads(notebook.read_text())["cells"]
    outputs = ["".join(out.get("data", {}).get("text/markdown", "")) for cell in cells for out in cell.get("outputs", [])]
    return sum(len(RAW_TABLE.findall(text.replace(" ", ""))) for text in outputs)


def test_no_page_shows_an_error_output(site):
    failed = [str(page.relative_to(site)) for page in site_pages(site) if ERROR_OUTPUT.search(page.read_text())]
    assert len(site_pages(site)) > len(PAGES)
    assert not failed, f"these pages show a traceback (a cell failed when its notebook was executed): {failed}"


def test_markdown_tables_are_rendered(site):
    raw = {}
    for page in site_pages(site):
        if match := RAW_TABLE.search(visible_text(page.read_text())):
            raw[str(page.relative_to(site))] = match.group(0)
    assert not raw, f"Markdown tables shown as raw text (nb_render_markdown_format in book.yml?): {raw}"
    notebooks = sorted(p for p in (ROOT / "chapters").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    expected = {nb: markdown_output_tables(nb) for nb in notebooks}
    assert sum(expected.values()) >= 6, f"the chapters print at least six tables: {expected}"
    for notebook, count in expected.items():
        page = site / notebook.relative_to(ROOT).with_suffix(".html")
        if count and page.exists():
            tables = page.read_text().count("<table")
            assert tables >= count, f"{page.name}: its notebook prints {count} tables, the page has {tables}"


def test_bibliography_resolves(site):
    html = (site / PAGES[0]).read_text()
    assert "Kalman" in html and "1960" in html, "the chapter's references should be rendered from references.bib"
