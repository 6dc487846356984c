"""Every chapter notebook is committed executed, top to bottom in one run.

nbval compares a notebook's fresh outputs with its committed ones: a notebook committed
without outputs would pass it while comparing nothing, and the site (built from the
committed outputs) would have no figures. So each code cell must carry an execution count,
the counts rising from the first cell to the last (one kernel, run in order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "chapters").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_committed_executed_in_order(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c.get("execution_count") for c in cells]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, f"{path.name}: code cells {missing} have no outputs committed: execute the notebook and save it"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: cells were run out of order ({counts}): restart the kernel, run all, save")
    assert any(c["outputs"] for c in cells), f"{path.name}: no outputs at all"
