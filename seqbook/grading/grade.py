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

Who is a student (:func:`student_key`): the name of their folder
(``<student>/<any>.ipynb``) or of their file (``<student>.ipynb``, a trailing
copy number `` (2)`` left out), compared after Unicode NFKC normalization, case
folding and collapsing spaces: ``Alice.ipynb``, ``alice (1).ipynb`` and
``alice/kalman.ipynb`` are one student.  Names with control or invisible
formatting characters are refused.  A student is graded once per chapter, from
the newest notebook (latest modification time; then the higher copy number,
then the later path); the others are listed, unscored, with a warning.

Every temporary folder (the tests' copies, the sandboxes' folders) lives under
one folder per run, removed on every way out: normal end, a notebook killed at
its time limit, a crashed test process, an interrupt or SIGTERM; one left by a
grader that was killed outright is removed by the next run.
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
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_NOTEBOOK_BYTES = 50 << 20
RUN_PREFIX = "seqbook-grade-run-"
_COPY = re.compile(r"^(?P<name>.*?)\s*\((?P<n>\d{1,4})\)$")  # "alice (2)": a repeated download
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
    ignored: str | None = None  # a duplicate of a newer notebook of this student and chapter: not graded

    @property
    def total(self) -> float:
        return sum(t["points"] for t in self.tests)

    @property
    def max(self) -> float:
        return sum(t["max_points"] for t in self.tests)


# ---------------------------------------------------------------- names


def clean(text: str, limit: int | None = None) -> str:
    """``text`` safe to print on one line or write in a gradebook: every control or formatting
    character (newlines, escapes, backspaces, bidirectional overrides) written as ``\\xNN`` /
    ``\\uNNNN``, so no name or message can draw forged lines on the instructor's terminal."""
    out = "".join(c if not unicodedata.category(c).startswith("C") else ascii(c)[1:-1] for c in str(text))
    return out if limit is None or len(out) <= limit else out[: limit - 3] + "..."


def name_problem(name: str) -> str | None:
    """Why ``name`` (a submitted file or folder name) is refused, or None."""
    bad = sorted({c for c in name if unicodedata.category(c).startswith("C")})
    if bad:
        return ("the name contains control or invisible characters (" + ", ".join(ascii(c) for c in bad)
                + "): rename the file or folder")
    if not name.strip():
        return "the name is empty"
    return None


def student_key(name: str) -> str:
    """The identity of a student named ``name``: NFKC, case-folded, spaces collapsed, no copy number."""
    name = " ".join(unicodedata.normalize("NFKC", name).split())
    match = _COPY.match(name)
    if match and match.group("name"):
        name = match.group("name")
    return name.casefold()


def _copy_number(path: Path) -> int:
    match = _COPY.match(path.stem.strip())
    return int(match.group("n")) if match else 0


def newest_first(paths: list[Path]) -> list[Path]:
    """Newest first: modification time, then copy number (``kalman (2).ipynb``), then path."""
    def when(path: Path):
        try:
            mtime = path.lstat().st_mtime_ns
        except OSError:
            mtime = 0
        return (mtime, _copy_number(path), str(path))

    return sorted(paths, key=when, reverse=True)


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


def remove_tree(path: Path) -> None:
    """Remove ``path`` whatever a submission did to it (folders made unreadable, files still
    being written by a sandbox that is dying): permissions restored, retried for a few seconds."""
    def fix(function, target, _exc):
        for folder in (os.path.dirname(target), target):
            try:
                os.chmod(folder, 0o700)
            except OSError:
                pass
        try:
            function(target)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(target, ignore_errors=True)
        except OSError:
            pass

    for attempt in range(50):
        if not os.path.lexists(path):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=fix)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        if attempt:
            time.sleep(0.1)


def sweep_stale_runs(tmp: Path | None = None) -> list[Path]:
    """Remove the run folders of graders that were killed outright (their process is gone)."""
    removed = []
    tmp = Path(tmp or tempfile.gettempdir())
    for entry in tmp.glob(RUN_PREFIX + "*"):
        pid = entry.name[len(RUN_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if entry.lstat().st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_tree(entry)
            removed.append(entry)
        except OSError:
            continue
    return removed


_run_root: Path | None = None  # this run's folder (see grade); None outside a run


def _run_pytest(test_file: Path, options: list[str], timeout: float):
    """Run a fresh copy of ``test_file`` with the grading plugin: (results or None, output, timed_out)."""
    parent = str(_run_root) if _run_root is not None else None
    work = Path(tempfile.mkdtemp(prefix="work-", dir=parent))  # mode 0700: the sandbox cannot look in
    # The sandbox's folder goes under a folder of its own (traversable, not listable, for a
    # sandbox that runs as nobody), removed below whatever happened to the processes.
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=parent))
    os.chmod(tmp, 0o711)
    try:
        shutil.copyfile(test_file, work / test_file.name)
        if (test_file.parent / "conftest.py").is_file():
            shutil.copyfile(test_file.parent / "conftest.py", work / "conftest.py")
        (work / "pytest.ini").write_text("[pytest]\naddopts =\n")
        results = work / "results.json"
        package_root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", TMPDIR=str(tmp),
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
        remove_tree(work)
        remove_tree(tmp)  # a sandbox killed with its test process never ran its own clean-up


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
                       outcome=got["outcome"], message=clean(got["message"]))
        else:
            row = dict(test=t["test"], points=0, max_points=t["max_points"], outcome="error", message=reason)
        result.tests.append(row)
    if data:
        result.cells = [dict(c, error=clean(c.get("error", ""))) for c in data.get("cells", [])]
        result.sandbox = data.get("sandbox", {})
    return result


# ---------------------------------------------------------------- the whole folder


def _read(path: Path, nbformat):
    """(notebook or None, why it cannot be graded or None)."""
    if path.is_symlink():
        return None, "the notebook is a symbolic link; submissions must be plain files"
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        return None, f"the notebook is over {MAX_NOTEBOOK_BYTES >> 20} MB"
    try:
        return nbformat.read(path, as_version=4), None
    except Exception as exc:
        return None, f"cannot read the notebook: {type(exc).__name__}: {clean(' '.join(str(exc).split()), 200)}"


def plan_submissions(root: Path, chapters: dict, chapters_path: Path | None, nbformat) -> list[dict]:
    """One entry per notebook found: student, path, label, chapter, why (no chapter), nb_error,
    ignored (a duplicate: why it is not graded).  Names are checked and cleaned here."""
    plan = []
    for name, path in find_submissions(root):
        label = str(path.relative_to(root)) if root.is_dir() else path.name
        parts = [name] + (list(path.relative_to(root).parts) if root.is_dir() else [])
        problem = next(filter(None, map(name_problem, parts)), None)
        item = dict(student=student_key(name) if not problem else clean(name), path=path, label=clean(label),
                    chapter=None, why=None, nb_error=None, ignored=None)
        if problem:
            item["nb_error"] = f"refused: {problem}"
        else:
            nb, item["nb_error"] = _read(path, nbformat)
            item["chapter"], item["why"] = resolve_chapter(nb, path, chapters, chapters_path)
        plan.append(item)
    # One notebook per student and chapter: the newest.
    groups: dict[tuple, list[dict]] = {}
    for item in plan:
        if item["chapter"] and not item["nb_error"]:
            groups.setdefault((item["student"], item["chapter"]), []).append(item)
    for (student, chapter), items in groups.items():
        if len(items) < 2:
            continue
        order = newest_first([i["path"] for i in items])
        kept = next(i for i in items if i["path"] == order[0])
        for item in items:
            if item is not kept:
                item["ignored"] = (f"duplicate: {student} handed in chapter {chapter} {len(items)} times; only the "
                                   f"newest, {kept['label']}, is graded")
    return plan


def grade(submissions, out=None, tests_dir="tests/grading", *, timeout: float = 120.0,
          call_timeout: float = 10.0, memory_mb: int = 4096, jobs: int | None = None,
          chapters_dir="chapters", echo=print) -> dict:
    """Grade every notebook under ``submissions``; write the gradebook to ``out`` (if given).

    Returns the gradebook as a dict (the content of ``gradebook.json``).
    """
    global _run_root
    root, tests_dir = Path(submissions), Path(tests_dir)
    if not root.exists():
        raise ValueError(f"submissions must be a folder of notebooks (or one .ipynb), got {str(root)!r}")
    if not tests_dir.is_dir():
        raise ValueError(f"tests_dir must be the folder of grading tests, got {str(tests_dir)!r}")
    chapters = available_chapters(tests_dir)
    chapters_path = Path(chapters_dir) if chapters_dir and Path(chapters_dir).is_dir() else None
    if not find_submissions(root):
        raise ValueError(f"no .ipynb found in {str(root)!r} (expected <student>.ipynb or <student>/*.ipynb)")
    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    import nbformat  # not at the top: each per-submission process imports this package, and nbformat is slow

    plan = plan_submissions(root, chapters, chapters_path, nbformat)
    sweep_stale_runs()
    _run_root = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))
    os.chmod(_run_root, 0o711)  # the sandboxes (maybe running as nobody) pass through, cannot list
    previous = None
    if threading.current_thread() is threading.main_thread():
        def terminate(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, terminate)  # killed politely: clean up like on Ctrl-C
    try:
        graded = [p for p in plan if not p["ignored"]]
        expected = {c: collect_tests(chapters[c]) for c in sorted({p["chapter"] for p in graded if p["chapter"]})}
        ignored = len(plan) - len(graded)
        echo(f"grading {len(graded)} notebook(s) from {clean(root)} with tests from {clean(tests_dir)} "
             f"({jobs} at a time)" + (f"; {ignored} duplicate(s) left out" if ignored else ""))

        def run(item):
            if item["ignored"]:
                return NotebookResult(item["student"], item["label"], item["chapter"], ignored=item["ignored"])
            return grade_notebook(item["student"], item["path"], item["label"], item["chapter"], item["why"],
                                  item["nb_error"], chapters.get(item["chapter"]), expected.get(item["chapter"], []),
                                  timeout=timeout, call_timeout=call_timeout, memory_mb=memory_mb)

        pool = ThreadPoolExecutor(max_workers=jobs)
        futures = [pool.submit(run, item) for item in plan]
        try:
            results = [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            with _live_lock:
                for proc in list(_live):
                    _kill_group(proc)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        remove_tree(_run_root)
        _run_root = None

    book = _gradebook(results, root, tests_dir, dict(timeout=timeout, call_timeout=call_timeout,
                                                     memory_mb=memory_mb))
    if out is not None:
        write_gradebook(book, Path(out))
    echo(summary(book, out))
    return book


def _gradebook(results: list[NotebookResult], root: Path, tests_dir: Path, limits: dict) -> dict:
    students: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r.student, r.notebook)):
        entry = students.setdefault(r.student, {"total": 0, "max": 0, "error": None, "warnings": [], "tests": [],
                                                "notebooks": []})
        if r.ignored:
            entry["warnings"].append(f"{r.notebook}: {r.ignored}")
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
            if nb.get("ignored"):  # a duplicate: listed, not scored
                rows.append([student, nb["notebook"], "", 0, 0, "ignored", nb["ignored"]])
            elif not nb["chapter"]:
                rows.append([student, nb["notebook"], "", 0, 0, "error", nb["error"]])  # no tests: one row says why
    rows = [[clean(v) if isinstance(v, str) else v for v in row] for row in rows]
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
    width = max([len(clean(s)) for s in book["students"]] + [7])
    for student, entry in book["students"].items():
        for nb in entry["notebooks"]:
            tests = [t for t in entry["tests"] if t["notebook"] == nb["notebook"]]
            problems = [f"{t['test']}: {t['message']}" for t in tests if t["outcome"] != "passed"]
            note = clean(nb.get("ignored") or nb["error"] or (problems[0] if problems else ""), 90)
            score = "ignored" if nb.get("ignored") else (
                f"{_fmt(nb['total'])}/{_fmt(nb['max'])}" if nb["chapter"] else "-")
            lines.append(f"{clean(student):<{width}}  {score:>7}  {clean(nb['notebook'])}  {note}".rstrip())
    lines.append(_layers(book))
    if out is not None:
        lines.append(f"gradebook: {Path(out) / 'gradebook.csv'}, {Path(out) / 'gradebook.json'}")
    return "\n".join(lines)
