"""Exercise cells and the student release of a chapter notebook.

How an exercise is marked in a chapter notebook (see ``chapters/instructors.md``):

- a **code cell tagged** ``exercise`` (cell metadata ``"tags": ["exercise"]``) holds
  one function the student writes; its solution sits between a line
  ``# BEGIN SOLUTION`` and a line ``# END SOLUTION``, at the indentation of the
  body.  An optional ``# HINT: ...`` line inside the block becomes the message
  of the stub;
- **worked answers in prose** sit between ``<!-- BEGIN SOLUTION -->`` and
  ``<!-- END SOLUTION -->`` in markdown cells (inside one cell, or spanning
  several cells; cells wholly inside the markers are dropped).

Exercise cells are numbered 1, 2, ... in notebook order: "Exercise N" in the
stub, in the grader's messages and in the chapter's prose all mean the N-th
cell tagged ``exercise``.

The release replaces every solution block by
``raise NotImplementedError("Exercise N: <hint>")`` at the same indentation,
removes the prose answers, and clears every output and execution count, so
nothing computed with the solution leaks either.  Notebook metadata (including
``{"seqbook": {"chapter": "01_kalman"}}``, which the grader reads) is kept.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

EXERCISE_TAG = "exercise"

_BEGIN = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN SOLUTION\s*$")
_END = re.compile(r"^[ \t]*#\s*END SOLUTION\s*$")
_HINT = re.compile(r"^[ \t]*#\s*HINT:\s*(?P<hint>.*?)\s*$")
_MD_BEGIN = re.compile(r"^\s*<!--\s*BEGIN SOLUTION\s*-->\s*$")
_MD_END = re.compile(r"^\s*<!--\s*END SOLUTION\s*-->\s*$")

DEFAULT_HINT = "replace this line with your solution"


def is_exercise(cell) -> bool:
    """True for a code cell tagged ``exercise``."""
    tags = cell.get("metadata", {}).get("tags", [])
    return cell.get("cell_type") == "code" and isinstance(tags, list) and EXERCISE_TAG in tags


def exercise_sources(nb) -> list[str]:
    """The source of every exercise cell, in order (Exercise 1 first).

    ``nb`` is a notebook as nbformat reads it, or as plain ``json.load`` does
    (the grader's per-submission process skips nbformat, whose import alone
    takes 1.5 s).

    IPython magics and shell escapes (``%time``, ``!pip ...``) are not Python;
    the grader runs plain Python, so those lines become ``pass`` (keeping their
    indentation) instead of turning a whole exercise into a SyntaxError.
    """
    sources = []
    for cell in nb["cells"]:
        if not is_exercise(cell):
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines = []
        for line in source.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("%", "!")):
                line = line[: len(line) - len(stripped)] + "pass  # IPython line skipped by the grader"
            lines.append(line)
        sources.append("\n".join(lines) + "\n")
    return sources


def _has_code_markers(source: str) -> bool:
    return any(_BEGIN.match(line) or _END.match(line) for line in source.splitlines())


def stub_exercise(source: str, number: int, where: str = "cell") -> str:
    """Replace each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block by a stub.

    The stub is ``raise NotImplementedError("Exercise <number>: <hint>")`` at the
    indentation of the ``# BEGIN SOLUTION`` line; the hint comes from a
    ``# HINT:`` line inside the block, else :data:`DEFAULT_HINT`.
    """
    out: list[str] = []
    block: list[str] | None = None
    indent = ""
    blocks = 0
    for line in source.splitlines():
        if block is None:
            begin = _BEGIN.match(line)
            if begin:
                block, indent = [], begin.group("indent")
            elif _END.match(line):
                raise ValueError(f"{where}: '# END SOLUTION' without a '# BEGIN SOLUTION' before it")
            else:
                out.append(line)
            continue
        if _BEGIN.match(line):
            raise ValueError(f"{where}: '# BEGIN SOLUTION' inside another solution block")
        if _END.match(line):
            hints = [m.group("hint") for m in map(_HINT.match, block) if m]
            message = f"Exercise {number}: {hints[0] if hints else DEFAULT_HINT}"
            # json.dumps writes a valid Python string literal (double quotes, escapes).
            out.append(f"{indent}raise NotImplementedError({json.dumps(message)})")
            block = None
            blocks += 1
        else:
            block.append(line)
    if block is not None:
        raise ValueError(f"{where}: '# BEGIN SOLUTION' without a matching '# END SOLUTION'")
    if blocks == 0:
        raise ValueError(
            f"{where} is tagged '{EXERCISE_TAG}' but has no '# BEGIN SOLUTION' / '# END SOLUTION' block"
        )
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def _strip_markdown(source: str, in_region: bool, where: str) -> tuple[str, bool]:
    """Remove the lines inside ``<!-- BEGIN/END SOLUTION -->`` (markers included).

    ``in_region`` carries a region that started in an earlier cell.
    """
    kept = []
    for line in source.splitlines():
        if _MD_BEGIN.match(line):
            if in_region:
                raise ValueError(f"{where}: '<!-- BEGIN SOLUTION -->' inside another solution region")
            in_region = True
        elif _MD_END.match(line):
            if not in_region:
                raise ValueError(f"{where}: '<!-- END SOLUTION -->' without a BEGIN before it")
            in_region = False
        elif not in_region:
            kept.append(line)
    return "\n".join(kept), in_region


def release_notebook(nb, name: str = "notebook"):
    """The student release of ``nb`` (a new notebook; ``nb`` is not modified).

    Raises ``ValueError`` naming the notebook and cell for unbalanced markers,
    an exercise cell without a solution block, solution markers in a code cell
    that is not tagged ``exercise`` (its solution would leak), or an exercise
    cell inside a prose solution region.
    """
    nb = copy.deepcopy(nb)
    cells = []
    number = 0
    in_region = False
    for index, cell in enumerate(nb.cells):
        where = f"{name}, cell {index}"
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if cell.cell_type == "markdown":
            touched = in_region or any(_MD_BEGIN.match(l) or _MD_END.match(l) for l in source.splitlines())
            text, in_region = _strip_markdown(source, in_region, where)
            if not touched:
                cells.append(cell)
            elif text.strip():  # a cell with some prose outside the answer keeps that prose
                cell.source = text
                cells.append(cell)
            continue
        if in_region:
            if is_exercise(cell):
                raise ValueError(f"{where}: an exercise cell inside a '<!-- BEGIN SOLUTION -->' region")
            continue  # worked answers may include code: drop it with the prose
        if cell.cell_type == "code":
            if is_exercise(cell):
                number += 1
                cell.source = stub_exercise(source, number, f"{where} (Exercise {number})")
            elif _has_code_markers(source):
                raise ValueError(
                    f"{where} has '# BEGIN SOLUTION' markers but is not tagged '{EXERCISE_TAG}': "
                    "tag it, or its solution would be published"
                )
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)  # run timestamps
        cells.append(cell)
    if in_region:
        raise ValueError(f"{name}: '<!-- BEGIN SOLUTION -->' without a matching '<!-- END SOLUTION -->'")
    nb.cells = cells
    return nb


def has_exercises(nb) -> bool:
    return any(is_exercise(cell) for cell in nb.cells)


def _notebooks(root: Path):
    for path in sorted(root.rglob("*.ipynb")):
        if any(part.startswith((".", "_build")) for part in path.relative_to(root).parts):
            continue  # .ipynb_checkpoints, hidden folders, built copies
        yield path


def release_tree(src: str | Path, out: str | Path) -> list[Path]:
    """Write the release of every notebook under ``src`` that has exercise cells.

    ``chapters/01_kalman/kalman.ipynb`` becomes ``<out>/chapters/01_kalman/kalman.ipynb``
    (the folder structure below ``src`` is kept).  Returns the paths written.
    """
    import nbformat  # here, not at the top: the grader's sandbox side imports this module too

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"src must be a folder of chapter notebooks, got {str(src)!r}")
    written = []
    for path in _notebooks(src):
        nb = nbformat.read(path, as_version=4)
        if not has_exercises(nb):
            continue
        released = release_notebook(nb, name=str(path))
        leftovers = [
            i for i, c in enumerate(released.cells)
            if "BEGIN SOLUTION" in (c.source if isinstance(c.source, str) else "".join(c.source))
        ]
        if leftovers:  # a marker we did not recognise (odd spacing): never publish it
            raise ValueError(f"{path}: cells {leftovers} still mention 'BEGIN SOLUTION' after the release")
        target = out / src.resolve().name / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(released, target)
        written.append(target)
    return written
