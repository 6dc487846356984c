"""Grade a folder of submitted notebooks into a gradebook.

Three layers, each distrusting the next:

1. this module (trusted): finds the notebooks, works out each one's chapter,
   collects that chapter's grading tests once (their names and points, before
   any student code runs), then grades the submissions, ``jobs`` at a time;
2. per submission, one **pytest process** (trusted) running a fresh copy of
   ``tests/grading/test_<chapter>.py`` in its own private temporary folder,
   with the :mod:`seqbook.grading.plugin` plugin; it is killed (with its
   process group) past ``timeout`` seconds;
3. inside it, the **sandbox process** (untrusted, :mod:`seqbook.grading.sandbox`)
   that runs only the notebook's exercise cells and answers function calls.

The gradebook is written only after every submission has finished, by this
process alone, so no submission can see or alter it, and the result does not
depend on ``jobs``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_NOTEBOOK_BYTES = 50 << 20
CSV_COLUMNS = ["student", "notebook", "test", "points", "max_points", "outcome", "message"]
_CHAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


@dataclass
class NotebookResult:
    student: str
    notebook: str  # path relative to the submissions folder
    chapter: str | None = None
    tests: list[dict] = field(default_factory=list)  # test, points, max_points, outcome, message
    cells: list[dict] = field(default_factory=list)  # exercise, ok, error
    sandbox: dict = field(default_factory=dict)  # which containment layers were active
    error: str | None = None  # the notebook as a whole could not be graded

    @property
    def total(self) -> float:
        return sum(t["points"] for t in self.tests)

    @property
    def max(self) -> float:
        return sum(t["max_points"] for t in self.tests)


# ---------------------------------------------------------------- finding things


def find_submissions(root: Path) -> list[tuple[str, Path]]:
    """``(student, notebook)`` pairs: ``<student>.ipynb`` or ``<student>/<anything>.ipynb``."""
    if root.is_file():
        return [(root.stem, root)]
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix == ".ipynb" and not entry.is_dir():
            found.append((entry.stem, entry))
        elif entry.is_dir() and not entry.is_symlink():
            for nb in sorted(entry.rglob("*.ipynb")):
                if not any(part.startswith(".") for part in nb.relative_to(entry).parts):
                    found.append((entry.name, nb))
    return found


def available_chapters(tests_dir: Path) -> dict[str, Path]:
    """chapter id -> its grading tests, from ``tests_dir/test_<chapter>.py``."""
    return {p.stem[len("test_"):]: p for p in sorted(tests_dir.glob("test_*.py"))}


def _topic(chapter: str) -> str:
    number, _, topic = chapter.partition("_")
    return topic if number.isdigit() and topic else chapter


def chapter_from_name(path: Path, chapters: dict[str, Path], chapters_dir: Path | None) -> str | None:
    """The one chapter whose id or topic the file name mentions, or whose notebook has this name."""
    stem = path.stem.lower()
    words = set(re.split(r"[^a-z0-9]+", stem))
    hits = set()
    for chapter in chapters:
        if chapter.lower() in stem or _topic(chapter).lower() in words:
            hits.add(chapter)
        elif chapters_dir is not None and (chapters_dir / chapter).is_dir():
            if any(nb.stem.lower() == stem for nb in (chapters_dir / chapter).glob("*.ipynb")):
                hits.add(chapter)
    return hits.pop() if len(hits) == 1 else None


def resolve_chapter(nb, path: Path, chapters: dict[str, Path], chapters_dir: Path | None):
    """(chapter, None) or (None, why not). The notebook's metadata first, then its file name."""
    declared = None
    if nb is not None:
        meta = nb.metadata.get("seqbook", {})
        declared = meta.get("chapter") if isinstance(meta, dict) else None
    if isinstance(declared, str) and _CHAPTER_ID.fullmatch(declared) and declared in chapters:
        return declared, None
    guessed = chapter_from_name(path, chapters, chapters_dir)
    if guessed:
        return guessed, None
    if isinstance(declared, str):
        return None, (f"the notebook's metadata says chapter {declared[:40]!r}, which has no grading tests "
                      f"(known: {', '.join(chapters) or 'none'})")
    return None, ("cannot tell the chapter: no seqbook.chapter in the notebook metadata, and the file name "
                  f"names none of: {', '.join(chapters) or 'none'}")


# ---------------------------------------------------------------- running pytest

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_pytest(test_file: Path, options: list[str], timeout: float):
    """Run a fresh copy of ``test_file`` with the grading plugin: (results or None, output, timed_out)."""
    work = Path(tempfile.mkdtemp(prefix="seqbook-grade-"))  # mode 0700: the sandbox cannot look in
    try:
        shutil.copyfile(test_file, work / test_file.name)
        if (test_file.parent / "conftest.py").is_file():
            shutil.copyfile(test_file.parent / "conftest.py", work / "conftest.py")
        (work / "pytest.ini").write_text("[pytest]\naddopts =\n")
        results = work / "results.json"
        package_root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "pytest", test_file.name, "-c", "pytest.ini", "--rootdir", str(work),
               "-p", "seqbook.grading.plugin", "-p", "no:cacheprovider", "-q", "--no-header",
               "--grading-results", str(results), *options]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with _live_lock:
            _live.add(proc)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)  # the sandbox dies with it (PR_SET_PDEATHSIG)
            output, _ = proc.communicate()
            timed_out = True
        finally:
            with _live_lock:
                _live.discard(proc)
        data = None
        if results.is_file():
            try:
                data = json.loads(results.read_text())
            except ValueError:
                data = None
        return data, output.decode(errors="replace"), timed_out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def collect_tests(test_file: Path) -> list[dict]:
    """The grading tests of one chapter and their points, without running anything."""
    data, output, timed_out = _run_pytest(test_file, ["--collect-only"], timeout=300)
    if data is None or not data["tests"]:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"could not collect the grading tests in {test_file}:\n{tail}")
    return [{"test": t["test"], "max_points": t["max_points"]} for t in data["tests"]]


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def grade_notebook(student: str, path: Path, label: str, chapter: str | None, why: str | None,
                   nb_error: str | None, test_file: Path | None, expected: list[dict], *, timeout: float,
                   call_timeout: float, memory_mb: int) -> NotebookResult:
    result = NotebookResult(student, label, chapter)
    if chapter is None:
        result.error = nb_error or why
        return result
    if nb_error is None:
        options = ["--grading-submission", str(path.resolve()), "--grading-call-timeout", str(call_timeout),
                   "--grading-memory-mb", str(memory_mb), "--grading-cpu-seconds", str(int(timeout) + 5)]
        data, output, timed_out = _run_pytest(test_file, options, timeout)
    else:
        data, output, timed_out = None, "", False
        result.error = nb_error
    ran = {t["test"]: t for t in (data or {}).get("tests", [])}
    if timed_out:
        reason = f"grading this notebook stopped at the {timeout:g}s limit before this test finished"
        result.error = reason
    elif nb_error:
        reason = nb_error
    elif data is None:
        reason = f"the grading process failed: {_last_line(output)}"
        result.error = reason
    else:
        reason = "this test did not run"
    for t in expected:
        got = ran.get(t["test"])
        if got and got["outcome"] not in ("not run",):
            row = dict(test=t["test"], points=got["points"], max_points=t["max_points"],
                       outcome=got["outcome"], message=got["message"])
        else:
            row = dict(test=t["test"], points=0, max_points=t["max_points"], outcome="error", message=reason)
        result.tests.append(row)
    if data:
        result.cells = data.get("cells", [])
        result.sandbox = data.get("sandbox", {})
    return result


# ---------------------------------------------------------------- the whole folder


def grade(submissions, out=None, tests_dir="tests/grading", *, timeout: float = 120.0,
          call_timeout: float = 10.0, memory_mb: int = 4096, jobs: int | None = None,
          chapters_dir="chapters", echo=print) -> dict:
    """Grade every notebook under ``submissions``; write the gradebook to ``out`` (if given).

    Returns the gradebook as a dict (the content of ``gradebook.json``).
    """
    root, tests_dir = Path(submissions), Path(tests_dir)
    if not root.exists():
        raise ValueError(f"submissions must be a folder of notebooks (or one .ipynb), got {str(root)!r}")
    if not tests_dir.is_dir():
        raise ValueError(f"tests_dir must be the folder of grading tests, got {str(tests_dir)!r}")
    chapters = available_chapters(tests_dir)
    chapters_path = Path(chapters_dir) if chapters_dir and Path(chapters_dir).is_dir() else None
    found = find_submissions(root)
    if not found:
        raise ValueError(f"no .ipynb found in {str(root)!r} (expected <student>.ipynb or <student>/*.ipynb)")
    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    import nbformat  # not at the top: each per-submission process imports this package, and nbformat is slow

    plan = []
    for student, path in found:
        label = str(path.relative_to(root)) if root.is_dir() else path.name
        nb, nb_error = None, None
        if path.is_symlink():
            nb_error = "the notebook is a symbolic link; submissions must be plain files"
        elif path.stat().st_size > MAX_NOTEBOOK_BYTES:
            nb_error = f"the notebook is over {MAX_NOTEBOOK_BYTES >> 20} MB"
        else:
            try:
                nb = nbformat.read(path, as_version=4)
            except Exception as exc:
                nb_error = f"cannot read the notebook: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        chapter, why = resolve_chapter(nb, path, chapters, chapters_path)
        plan.append((student, path, label, chapter, why, nb_error))

    expected = {c: collect_tests(chapters[c]) for c in sorted({p[3] for p in plan if p[3]})}
    echo(f"grading {len(plan)} notebook(s) from {root} with tests from {tests_dir} ({jobs} at a time)")

    def run(item):
        student, path, label, chapter, why, nb_error = item
        return grade_notebook(student, path, label, chapter, why, nb_error, chapters.get(chapter),
                              expected.get(chapter, []), timeout=timeout, call_timeout=call_timeout,
                              memory_mb=memory_mb)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(run, plan))
    except BaseException:
        with _live_lock:
            for proc in list(_live):
                _kill_group(proc)
        raise

    book = _gradebook(results, root, tests_dir, dict(timeout=timeout, call_timeout=call_timeout,
                                                     memory_mb=memory_mb))
    if out is not None:
        write_gradebook(book, Path(out))
    echo(summary(book, out))
    return book


def _gradebook(results: list[NotebookResult], root: Path, tests_dir: Path, limits: dict) -> dict:
    students: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r.student, r.notebook)):
        entry = students.setdefault(r.student, {"total": 0, "max": 0, "error": None, "tests": [], "notebooks": []})
        entry["total"] += r.total
        entry["max"] += r.max
        if r.error:
            entry["error"] = "; ".join(filter(None, [entry["error"], f"{r.notebook}: {r.error}"]))
        entry["tests"] += [dict(notebook=r.notebook, chapter=r.chapter, **t) for t in r.tests]
        entry["notebooks"].append({k: v for k, v in asdict(r).items() if k not in ("student", "tests")}
                                  | {"total": r.total, "max": r.max})
    return {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "submissions": str(root),
        "tests": str(tests_dir),
        "limits": limits,
        "students": students,
    }


def write_gradebook(book: dict, out: Path) -> None:
    """``gradebook.csv`` (one row per student, notebook and test) and ``gradebook.json``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for student, entry in book["students"].items():
        for t in entry["tests"]:
            rows.append([student, t["notebook"], t["test"], t["points"], t["max_points"], t["outcome"],
                         t["message"]])
        for nb in entry["notebooks"]:
            if not nb["chapter"]:  # no tests to list: one row says why
                rows.append([student, nb["notebook"], "", 0, 0, "error", nb["error"]])
    tmp = out / "gradebook.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, out / "gradebook.csv")
    tmp = out / "gradebook.json.tmp"
    tmp.write_text(json.dumps(book, indent=1))
    os.replace(tmp, out / "gradebook.json")


def _fmt(x: float) -> str:
    return f"{x:g}"


def _layers(book: dict) -> str:
    seen = [nb["sandbox"] for s in book["students"].values() for nb in s["notebooks"] if nb["sandbox"]]
    if not seen:
        return "sandbox: no submission reached it"
    landlock = sorted({s.get("landlock", 0) for s in seen})
    parts = [
        "uid " + ("nobody" if all(s.get("dropped_to") for s in seen) else
                  ("root without capabilities" if all(s.get("capabilities_dropped") for s in seen)
                   else "of the grader")),
        "landlock " + ("ABI " + "/".join(map(str, landlock)) if all(landlock) else "off"),
        "seccomp " + ("on" if all(s.get("seccomp") for s in seen) else "off"),
        "audit hook " + ("on" if all(s.get("audit_hook") for s in seen) else "off"),
    ]
    line = "sandbox: " + ", ".join(parts)
    if not all(s.get("landlock") or s.get("dropped_to") for s in seen):
        line += ("\nWARNING: no kernel-level file protection on this machine (no Landlock, and no unprivileged "
                 "user): a determined submission could write files that the grader's user can write. "
                 "Grade inside a container or VM.")
    return line


def summary(book: dict, out=None) -> str:
    """A table for the console: one line per notebook, the first problem of each."""
    lines = []
    width = max([len(s) for s in book["students"]] + [7])
    for student, entry in book["students"].items():
        for nb in entry["notebooks"]:
            tests = [t for t in entry["tests"] if t["notebook"] == nb["notebook"]]
            problems = [f"{t['test']}: {t['message']}" for t in tests if t["outcome"] != "passed"]
            note = nb["error"] or (problems[0] if problems else "")
            if len(note) > 90:
                note = note[:87] + "..."
            score = f"{_fmt(nb['total'])}/{_fmt(nb['max'])}" if nb["chapter"] else "-"
            lines.append(f"{student:<{width}}  {score:>7}  {nb['notebook']}  {note}".rstrip())
    lines.append(_layers(book))
    if out is not None:
        lines.append(f"gradebook: {Path(out) / 'gradebook.csv'}, {Path(out) / 'gradebook.json'}")
    return "\n".join(lines)
