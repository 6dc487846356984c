"""seqbook.grading: the student release, and the grader against honest, broken and hostile notebooks.

One grading run (module fixture ``graded``) grades a folder of submissions built
here, through the real command line; the tests then read its gradebook.  The
hostile submissions only ever target copies placed in the test's temporary
folder (never files of the repository), and are given those copies' absolute
paths.  Each hostile function returns a correct answer only if every attack
failed, so "full marks" means "contained"; the files are also hashed before
and after.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import textwrap
import threading
from pathlib import Path

import nbformat
import pytest

from seqbook.grading import grade, release_notebook
from seqbook.grading.cli import main
from seqbook.grading.grade import clean, newest_first, student_key

REPO = Path(__file__).resolve().parents[1]
KALMAN_TESTS = REPO / "tests" / "grading" / "test_01_kalman.py"
REAL_NOTEBOOK = REPO / "chapters" / "01_kalman" / "kalman.ipynb"
CALL_TIMEOUT = 3  # seconds; the honest functions take milliseconds

# Independent solutions of the four chapter-1 exercises (plain torch, not seqbook.kalman),
# so that a pass also cross-checks the grading tests against the library.
PREDICT = '''
import torch

def kf_predict(x, P, F, Q):
    """x_pred = F x, P_pred = F P F^T + Q."""
    # BEGIN SOLUTION
    x_pred = (F @ x.unsqueeze(-1)).squeeze(-1)
    P_pred = F @ P @ F.mT + Q
    return x_pred, P_pred
    # END SOLUTION
'''
UPDATE = '''
import torch

def kf_update(x, P, z, H, R):
    """Kalman update with the Joseph-form covariance."""
    # BEGIN SOLUTION
    # HINT: solve with S, never invert it; Joseph form for P
    y = z - (H @ x.unsqueeze(-1)).squeeze(-1)
    S = H @ P @ H.mT + R
    K = torch.linalg.solve(S, H @ P).mT  # (S^-1 H P)^T = P H^T S^-1, P and S symmetric
    x_post = x + (K @ y.unsqueeze(-1)).squeeze(-1)
    A = torch.eye(x.shape[-1], dtype=x.dtype) - K @ H
    P_post = A @ P @ A.mT + K @ R @ K.mT
    return x_post, P_post
    # END SOLUTION
'''
RTS = '''
import torch

def rts_step(x_filt, P_filt, x_pred_next, P_pred_next, x_smooth_next, P_smooth_next, F):
    """One backward step of the RTS smoother."""
    # BEGIN SOLUTION
    G = torch.linalg.solve(P_pred_next, F @ P_filt).mT  # P_filt F^T P_pred^-1
    x_s = x_filt + (G @ (x_smooth_next - x_pred_next).unsqueeze(-1)).squeeze(-1)
    P_s = P_filt + G @ (P_smooth_next - P_pred_next) @ G.mT
    return x_s, P_s
    # END SOLUTION
'''
NIS = '''
import torch

def nis(innovation, S):
    """y^T S^-1 y over the last dimension."""
    # BEGIN SOLUTION
    y = innovation.unsqueeze(-1)
    return (y.mT @ torch.linalg.solve(S, y)).squeeze(-1).squeeze(-1)
    # END SOLUTION
'''
SOLUTIONS = [PREDICT, UPDATE, RTS, NIS]
FIRST_FOUR = """

for _name in [name for name in globals() if name.startswith("test_")]:
    if _name not in ("test_kf_predict", "test_kf_update", "test_rts_step", "test_nis"):
        del globals()[_name]
"""
PROSE = "Exercise 4 asks why NIS is chi-square.\n<!-- BEGIN SOLUTION -->\nBecause y is Gaussian.\n<!-- END SOLUTION -->\nNext: smoothing."


def notebook(cells, chapter: str | None = "01_kalman", outputs: bool = True):
    """A chapter notebook: one markdown cell with a prose answer, then one exercise cell per source."""
    nb = nbformat.v4.new_notebook()
    if chapter:
        nb.metadata["seqbook"] = {"chapter": chapter}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(PROSE))
    for count, source in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(textwrap.dedent(source).strip() + "\n")
        cell.metadata["tags"] = ["exercise"]
        if outputs:
            cell.execution_count = count
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"ran cell {count}\n")]
        nb.cells.append(cell)
    return nb


def attack_files(targets: list[Path]) -> str:
    """Code that tries every way we know to destroy each target; ``_attack()`` is True if one worked."""
    return f'''
import os, shutil, torch

TARGETS = {[str(t) for t in targets]!r}

def _attack():
    worked = False
    for target in TARGETS:
        for attempt in (
            lambda: os.remove(target),
            lambda: shutil.rmtree(target),
            lambda: open(target, "w").write("pwned"),
            lambda: open(target, "a").write("pwned"),
            lambda: os.rename(target, target + ".moved"),
            lambda: os.truncate(target, 0),
            lambda: os.chmod(target, 0),
            lambda: torch.save(torch.zeros(1), target),  # native code: no audit event, Landlock stops it
            lambda: torch.save(torch.zeros(1), os.path.join(target, "dropped.pt")),
            lambda: torch.from_file(target, shared=True, size=1, dtype=torch.uint8).fill_(0),
            lambda: open(target).read(),  # reading another student's notebook is refused too
        ):
            try:
                attempt()
                worked = True
            except BaseException:
                pass
    return worked

if _attack():
    raise SystemExit("escaped at cell execution")
'''


NIS_AFTER_ATTACK = '''
import torch

def nis(innovation, S):
    if _attack():  # an escape costs the points: the answer is wrong on purpose
        return torch.zeros(innovation.shape[:-1], dtype=innovation.dtype)
    y = innovation.unsqueeze(-1)
    return (y.mT @ torch.linalg.solve(S, y)).squeeze(-1).squeeze(-1)
'''

NIS_AFTER_EXEC = '''
import os, subprocess, torch

def _escaped():
    ran = []
    def attempt(fn, success):
        try:
            ran.append(success(fn()))
        except BaseException:
            ran.append(False)
    attempt(lambda: os.system("exit 7"), lambda r: r == 7 << 8)
    attempt(lambda: subprocess.run(["/bin/sh", "-c", "exit 7"]).returncode, lambda r: r == 7)
    attempt(lambda: os.posix_spawn("/bin/sh", ["sh", "-c", "exit 7"], {}), lambda pid: pid > 0)
    attempt(lambda: os.popen("echo 7").read(), lambda out: out.strip() == "7")
    pid = None
    try:
        pid = os.fork()
    except BaseException:
        pass
    if pid == 0:
        os._exit(0)
    ran.append(pid is not None)
    try:
        os.execv("/bin/sh", ["sh", "-c", "exit 7"])  # if it worked, this process is gone
    except BaseException:
        pass
    return any(ran)

def nis(innovation, S):
    if _escaped():
        return torch.zeros(innovation.shape[:-1], dtype=innovation.dtype)
    y = innovation.unsqueeze(-1)
    return (y.mT @ torch.linalg.solve(S, y)).squeeze(-1).squeeze(-1)
'''

TOY_TESTS = '''
import pytest
import torch
from seqbook.grading.checks import assert_close

# double may not use kalman.predict, nor invert a matrix (though neither has anything to do with
# doubling): the toy submissions check that the blocks hold and that the library's own calls to
# a blocked function still work.
FORBIDDEN = {"double": ["seqbook.kalman.predict", "seqbook.nn.LSTMMixer.forward", "aten::linalg_inv_ex"]}

@pytest.mark.points(1)
def test_double(submission):
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(submission.double(x), 2 * x, "double(x)")
'''

# kalman_filter calls kalman.predict itself, a ResidualBlock calls its LSTMMixer's forward through
# torch's Module.__call__: both allowed, while double's own calls are not.
DOUBLE_VIA_FILTER = '''
import torch
import seqbook.kalman as K
import seqbook.nn

def double(x):
    eye = torch.eye(1, dtype=torch.float64)
    result = K.kalman_filter(torch.zeros(1, 2, 1, dtype=torch.float64), eye, eye, eye, eye,
                             torch.zeros(1, 1, dtype=torch.float64), eye)
    assert result.x_pred.shape == (1, 2, 1)
    block = seqbook.nn.ResidualBlock(seqbook.nn.LSTMMixer(2), 2)
    assert block(torch.zeros(1, 3, 2)).shape == (1, 3, 2)
    return 2 * x
'''
DOUBLE_VIA_LAYER = '''
import torch
import seqbook.nn

def double(x):
    seqbook.nn.LSTMMixer(2)(torch.zeros(1, 3, 2))
    return 2 * x
'''
DOUBLE_VIA_PREDICT = '''
import torch
from seqbook.kalman import predict as p

def double(x):
    eye = torch.eye(1, dtype=torch.float64)
    p(torch.zeros(1, dtype=torch.float64), eye, eye, eye)
    return 2 * x
'''

# an inverse through a Tensor method: the ATen operator is blocked however it is reached
DOUBLE_VIA_INVERSE = '''
import torch

def double(x):
    two = torch.linalg.inv(torch.eye(2, dtype=x.dtype) / 2)
    return two[0, 0] * x
'''

# Every way we know to reach the library's version of an exercise function: each function
# returns the right answer only if one of them worked, else raises the list of what stopped
# each route (so a score of 0 with that message means "all blocked").
LIBRARY_ROUTES = '''
import importlib, importlib.util, sys, types
import torch
import seqbook.kalman
from seqbook.kalman import predict as _alias_predict, update as _alias_update, rts_step as _alias_rts, nis as _alias_nis

_ALIASES = {"predict": _alias_predict, "update": _alias_update, "rts_step": _alias_rts, "nis": _alias_nis}
_AT_CELL = []
try:  # at the top level of the cell: precompute with the library
    _AT_CELL.append(seqbook.kalman.nis(torch.ones(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64)))
except Exception as exc:
    _AT_CELL.append(exc)

def _fresh_module():
    spec = importlib.util.spec_from_file_location("kalman_copy", seqbook.kalman.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def _exec_source():
    namespace = {"__name__": "kalman_copy"}
    exec(open(seqbook.kalman.__file__).read(), namespace)
    return types.SimpleNamespace(**namespace)

def _routes(name):
    kalman = seqbook.kalman
    return {
        "attr": lambda: getattr(kalman, name),
        "alias": lambda: _ALIASES[name],
        "string": lambda: getattr(importlib.import_module("seqbook." + "kal" + "man"), name),
        "reload": lambda: getattr(importlib.reload(kalman), name),
        "spec": lambda: getattr(_fresh_module(), name),
        "exec": lambda: getattr(_exec_source(), name),
        "code": lambda: types.FunctionType(kalman.kalman_filter.__code__, {**vars(kalman), "update": None}),
        "clone": lambda: types.FunctionType(getattr(kalman, name).__code__, vars(kalman), name, None,
                                            getattr(kalman, name).__closure__),
        "audit": lambda: (lambda *a: (lambda box: (sys.audit("seqbook.grading.forbidden", "seqbook.kalman." + name,
                                                             a, {}, box), box[0])[1])([])),
        "reset": lambda: (sys.modules["__main__"]._call("other", lambda: None, (), {}, None), getattr(kalman, name))[1],
    }

def _library(name, *args):
    errors = [] if not isinstance(_AT_CELL[0], Exception) else [f"cell={type(_AT_CELL[0]).__name__}"]
    if not errors:
        errors.append("cell=worked")
    for route, get in _routes(name).items():
        try:
            return get()(*args)
        except Exception as exc:
            errors.append(f"{route}={type(exc).__name__}")
    raise RuntimeError("blocked " + " ".join(errors))

def kf_predict(x, P, F, Q):
    return seqbook.kalman.predict(x, P, F, Q)

def kf_update(x, P, z, H, R):
    return _library("update", x, P, z, H, R)[:2]

def rts_step(*args):
    return _library("rts_step", *args)

def nis(innovation, S):
    return _library("nis", innovation, S)
'''


def sha(path: Path) -> str:
    if path.is_dir():
        return "|".join(f"{p.relative_to(path)}:{sha(p)}" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Build the submissions, run ``python -m seqbook.grading grade`` once, return what it wrote."""
    root = tmp_path_factory.mktemp("grading")
    tests = root / "tests" / "grading"
    tests.mkdir(parents=True)
    # Exercises 1-4 of chapter 1, whatever the chapter adds later: the crafted notebooks hold those four.
    (tests / "test_01_kalman.py").write_text(KALMAN_TESTS.read_text() + FIRST_FOUR)
    (tests / "test_99_toy.py").write_text(TOY_TESTS)
    subs, out = root / "submissions", root / "gradebook"
    subs.mkdir()
    out.mkdir()
    (out / "keep.txt").write_text("an instructor's file next to the gradebook")
    canary = root / "canary.txt"
    canary.write_text("nothing may touch this")

    solution = notebook(SOLUTIONS)
    broken = {
        # a syntax error in Exercise 1, an exception when the cell of Exercise 3 runs
        "broken_cells": [PREDICT.replace("P_pred = F @ P", "P_pred = F @@ P"), UPDATE,
                         'raise RuntimeError("broken cell")\n' + RTS, NIS],
        # an infinite loop inside kf_predict, and one at the top level of the cell of Exercise 2
        "loops": [PREDICT.replace("# BEGIN SOLUTION", "# BEGIN SOLUTION\n    while True:\n        pass"),
                  "while True:\n    pass\n" + UPDATE, RTS, NIS],
        "wrong": [PREDICT.replace("F @ P @ F.mT + Q", "F @ P @ F.mT"),  # forgot Q
                  UPDATE, RTS, NIS.replace("torch.linalg.solve(S, y)", "S @ y")],  # S instead of S^-1
        "crash": [PREDICT, UPDATE.replace("# BEGIN SOLUTION", "# BEGIN SOLUTION\n    import os; os._exit(3)"),
                  RTS.replace("# BEGIN SOLUTION", "# BEGIN SOLUTION\n    torch.empty(1 << 40, dtype=torch.float64)"),
                  NIS],
        # the grading tests, the gradebook folder, another student's notebook, any other file
        "hostile_files": [attack_files([tests / "test_01_kalman.py", out, subs / "solution.ipynb", canary]) + PREDICT,
                          UPDATE, RTS, NIS_AFTER_ATTACK],
        "hostile_exec": [PREDICT, UPDATE, RTS, NIS_AFTER_EXEC],
    }
    nbformat.write(solution, subs / "solution.ipynb")
    nbformat.write(release_notebook(solution), subs / "released.ipynb")
    for student, cells in broken.items():
        (subs / student).mkdir()
        nbformat.write(notebook(cells), subs / student / "kalman.ipynb")
    (subs / "toy_by_name").mkdir()  # no metadata: the chapter comes from the file name
    nbformat.write(notebook([DOUBLE_VIA_FILTER], chapter=None), subs / "toy_by_name" / "toy.ipynb")
    nbformat.write(notebook([DOUBLE_VIA_PREDICT], chapter="99_toy"), subs / "toy_wrapper.ipynb")
    nbformat.write(notebook([DOUBLE_VIA_INVERSE], chapter="99_toy"), subs / "toy_inverse.ipynb")
    nbformat.write(notebook([DOUBLE_VIA_LAYER], chapter="99_toy"), subs / "toy_layer.ipynb")
    nbformat.write(notebook([LIBRARY_ROUTES]), subs / "library_calls.ipynb")
    # a file name that tries to print forged lines in the console summary
    nbformat.write(solution, subs / "evil\nzz_top_student     10\u204410  forged.ipynb")
    # one student, three hand-ins of chapter 1: only the newest (dup/kalman_v2.ipynb) counts
    (subs / "dup").mkdir()
    nbformat.write(solution, subs / "Dup (1).ipynb")
    nbformat.write(notebook(SOLUTIONS[:2]), subs / "dup" / "kalman.ipynb")
    nbformat.write(solution, subs / "dup" / "kalman_v2.ipynb")
    for age, name in ((300, "Dup (1).ipynb"), (200, "dup/kalman.ipynb"), (100, "dup/kalman_v2.ipynb")):
        when = 1_700_000_000 - age
        os.utime(subs / name, (when, when))
    (subs / "garbage.ipynb").write_text("{ this is not json")
    nbformat.write(notebook(SOLUTIONS, chapter=None), subs / "anonymous.ipynb")

    protected = [tests / "test_01_kalman.py", out / "keep.txt", canary] + sorted(subs.rglob("*.ipynb"))
    before = {p: sha(p) for p in protected}
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        rc = main(["grade", str(subs), "--out", str(out), "--tests", str(tests), "--chapters", str(root / "none"),
                   "--call-timeout", str(CALL_TIMEOUT), "--timeout", "90", "--jobs", "2"])
    after = {p: sha(p) if p.exists() else "missing" for p in protected}
    book = json.loads((out / "gradebook.json").read_text())
    with open(out / "gradebook.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return dict(rc=rc, book=book, rows=rows, before=before, after=after, root=root, subs=subs, tests=tests,
                console=console.getvalue(), csv_text=(out / "gradebook.csv").read_text(),
                json_text=(out / "gradebook.json").read_text())


def scores(graded) -> dict[str, dict[str, float]]:
    """student -> test -> points."""
    result = {}
    for student, entry in graded["book"]["students"].items():
        result[student] = {t["test"]: t["points"] for t in entry["tests"]}
    return result


def message(graded, student: str, test: str) -> str:
    return next(t["message"] for t in graded["book"]["students"][student]["tests"] if t["test"] == test)


FULL = {"test_kf_predict": 2, "test_kf_update": 3, "test_rts_step": 3, "test_nis": 2}


@pytest.mark.slow
def test_solution_scores_full_marks_and_release_zero(graded):
    assert graded["rc"] == 0
    book = graded["book"]["students"]
    assert scores(graded)["solution"] == FULL
    assert book["solution"]["total"] == book["solution"]["max"] == 10
    assert all(c["ok"] for c in book["solution"]["notebooks"][0]["cells"])
    assert book["released"]["total"] == 0 and book["released"]["max"] == 10
    for test in FULL:
        assert "NotImplementedError: Exercise" in message(graded, "released", test)
    assert "Exercise 2: solve with S" in message(graded, "released", "test_kf_update")  # from the HINT line


@pytest.mark.slow
def test_broken_submissions_lose_only_their_broken_exercises(graded):
    s = scores(graded)
    assert s["broken_cells"] == FULL | {"test_kf_predict": 0, "test_rts_step": 0}
    assert "SyntaxError" in message(graded, "broken_cells", "test_kf_predict")
    assert "Exercise 1" in message(graded, "broken_cells", "test_kf_predict")
    assert "RuntimeError: broken cell" in message(graded, "broken_cells", "test_rts_step")
    assert s["loops"] == FULL | {"test_kf_predict": 0, "test_kf_update": 0}
    assert f"kf_predict timed out after {CALL_TIMEOUT}s" in message(graded, "loops", "test_kf_predict")
    assert f"Exercise 2 failed: timed out after {CALL_TIMEOUT}s" in message(graded, "loops", "test_kf_update")
    assert s["wrong"] == FULL | {"test_kf_predict": 0, "test_nis": 0}
    assert "P_pred (x of shape (5, 3), per-batch matrices) differs from the reference" in message(
        graded, "wrong", "test_kf_predict")
    assert "nis (innovation of shape (3, 7, 2)) differs" in message(graded, "wrong", "test_nis")
    assert s["crash"] == FULL | {"test_kf_update": 0, "test_rts_step": 0}
    assert "crashed the sandbox process: exit code 3" in message(graded, "crash", "test_kf_update")
    assert "allocate" in message(graded, "crash", "test_rts_step")  # the memory limit, as an error


@pytest.mark.slow
def test_hostile_submissions_are_contained(graded):
    s = scores(graded)
    for student in ("hostile_files", "hostile_exec"):
        assert s[student] == FULL, (student, graded["book"]["students"][student])
    for path, digest in graded["before"].items():
        assert graded["after"][path] == digest, f"{path} was changed by a submission"
    root = graded["root"]
    assert not list(root.rglob("*.moved")) and not list(root.rglob("dropped.pt"))
    sandbox = graded["book"]["students"]["hostile_files"]["notebooks"][0]["sandbox"]
    assert sandbox["audit_hook"]
    # What kept torch.save (native code, no audit event) out: Landlock or an unprivileged uid.
    assert sandbox["landlock"] or sandbox["dropped_to"], f"no kernel-level file protection here: {sandbox}"


@pytest.mark.slow
def test_gradebook_layout(graded):
    rows, book = graded["rows"], graded["book"]
    assert list(rows[0]) == ["student", "notebook", "test", "points", "max_points", "outcome", "message"]
    solution_rows = [r for r in rows if r["student"] == "solution"]
    assert [(r["test"], r["points"], r["outcome"]) for r in solution_rows] == [
        ("test_kf_predict", "2", "passed"), ("test_kf_update", "3", "passed"),
        ("test_rts_step", "3", "passed"), ("test_nis", "2", "passed")]
    assert {r["notebook"] for r in rows if r["student"] == "loops"} == {"loops/kalman.ipynb"}
    # chapter from the file name; unreadable and unplaceable notebooks are errors, not crashes
    assert book["students"]["toy_by_name"]["total"] == 1 == book["students"]["toy_by_name"]["max"], \
        book["students"]["toy_by_name"]
    assert book["students"]["toy_by_name"]["notebooks"][0]["chapter"] == "99_toy"
    assert "cannot tell the chapter" in book["students"]["anonymous"]["error"]
    assert "cannot read the notebook" in book["students"]["garbage"]["error"]
    assert [r["outcome"] for r in rows if r["student"] == "garbage"] == ["error"]


@pytest.mark.slow
def test_calling_the_library_instead_of_writing_the_exercise_earns_nothing(graded):
    s = scores(graded)
    assert s["library_calls"] == dict.fromkeys(FULL, 0), graded["book"]["students"]["library_calls"]
    direct = message(graded, "library_calls", "test_kf_predict")
    assert "kf_predict may not use seqbook.kalman.predict" in direct and "Exercise 1 asks you to write it" in direct
    # every other route was tried and stopped (the function raises the list when none worked)
    routes = ("cell", "attr", "alias", "string", "reload", "spec", "exec", "code", "clone", "audit", "reset")
    for test in ("test_kf_update", "test_rts_step", "test_nis"):
        text = message(graded, "library_calls", test)
        assert "raised RuntimeError: blocked" in text, text
        for route in routes:
            assert f"{route}=" in text and f"{route}=worked" not in text, (route, text)
    assert "cell=PermissionError" in message(graded, "library_calls", "test_nis")
    # the library's own call to a blocked function still works (kalman_filter calls predict) ...
    assert scores(graded)["toy_by_name"] == {"test_double": 1}
    # ... a student's does not, under any name
    assert scores(graded)["toy_wrapper"] == {"test_double": 0}
    assert "double may not use seqbook.kalman.predict" in message(graded, "toy_wrapper", "test_double")
    assert scores(graded)["toy_layer"] == {"test_double": 0}
    assert "double may not use seqbook.nn.LSTMMixer.forward" in message(graded, "toy_layer", "test_double")
    # an ATen operator is blocked however it is reached (here torch.linalg.inv)
    assert scores(graded)["toy_inverse"] == {"test_double": 0}
    assert "double may not use torch's linalg_inv_ex (aten::linalg_inv_ex)" in message(graded, "toy_inverse", "test_double")


@pytest.mark.slow
def test_names_cannot_forge_lines(graded):
    """A file name with a newline is refused, and printed and written escaped."""
    forged = "evil\\nzz_top_student     10\u204410  forged"
    assert not any(line.startswith("zz_top_student") for line in graded["console"].splitlines()), graded["console"]
    assert forged in graded["console"]
    entry = graded["book"]["students"][forged]
    assert entry["total"] == 0 and "control or invisible characters ('\\n')" in entry["error"]
    for student, value in graded["book"]["students"].items():
        assert clean(student) == student
        for t in value["tests"]:
            assert clean(t["message"]) == t["message"] and clean(t["notebook"]) == t["notebook"]
    assert all(clean(value) == value for row in graded["rows"] for value in row.values())
    assert "zz_top_student" not in "".join(line for line in graded["csv_text"].splitlines() if "evil" not in line)


@pytest.mark.slow
def test_one_notebook_per_student_and_chapter(graded):
    entry = graded["book"]["students"]["dup"]
    assert entry["total"] == entry["max"] == 10  # once, not 30 (nor 25: the older copy scores 5)
    graded_notebooks = [nb["notebook"] for nb in entry["notebooks"] if not nb["ignored"]]
    assert graded_notebooks == ["dup/kalman_v2.ipynb"]
    assert len(entry["warnings"]) == 2 and all("only the newest, dup/kalman_v2.ipynb" in w for w in entry["warnings"])
    ignored = sorted(r["notebook"] for r in graded["rows"] if r["student"] == "dup" and r["outcome"] == "ignored")
    assert ignored == ["Dup (1).ipynb", "dup/kalman.ipynb"]
    assert "ignored" in graded["console"]


def test_a_forbidden_pattern_matching_nothing_fails_the_collection(tmp_path):
    from seqbook.grading.grade import collect_tests

    test_file = tmp_path / "test_99_typo.py"
    test_file.write_text(TOY_TESTS.replace("seqbook.kalman.predict", "seqbook.kalman.predikt"))
    with pytest.raises(RuntimeError, match=r"seqbook.kalman.predikt matches no function of seqbook"):
        collect_tests(test_file)


def test_student_names_and_newest(tmp_path):
    assert student_key("Alice") == student_key("alice (2)") == student_key(" ALICE ") == "alice"
    assert student_key("Ａｌｉｃｅ") == "alice" and student_key("bob smith") == student_key("Bob   Smith")
    assert student_key("alice-2") != "alice"  # only the " (N)" that downloads add is a copy number
    paths = [tmp_path / n for n in ("kalman.ipynb", "kalman (2).ipynb", "kalman (10).ipynb", "b.ipynb", "a.ipynb")]
    for p in paths:
        p.write_text("{}")
        os.utime(p, (1_700_000_000, 1_700_000_000))
    os.utime(paths[3], (1_700_000_100, 1_700_000_100))
    order = [p.name for p in newest_first(paths)]
    # the latest time first; equal times: the higher copy number, then the later name
    assert order == ["b.ipynb", "kalman (10).ipynb", "kalman (2).ipynb", "kalman.ipynb", "a.ipynb"]
    assert clean("a\nb\x1b[2K\u202ec") == "a\\nb\\x1b[2K\\u202ec"


HOG = '''
import time

with open("leftover.bin", "wb") as f:  # inside its own folder: allowed
    f.write(b"x" * (1 << 20))
time.sleep(10_000)  # then hang until the grader's time limit

def double(x):
    return 2 * x
'''


@pytest.mark.slow
def test_no_leftovers_when_a_notebook_is_killed_at_its_time_limit(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where the grader makes its folders
    tests, subs = tmp_path / "tests", tmp_path / "subs"
    tests.mkdir()
    subs.mkdir()
    (tests / "test_99_toy.py").write_text(TOY_TESTS)
    nbformat.write(notebook([HOG], chapter="99_toy"), subs / "hog.ipynb")
    # the run folder of a grader killed outright (no process has this id: above pid_max)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    stale = tmp / f"seqbook-grade-run-{dead}-abc"
    (stale / "tmp-x").mkdir(parents=True)
    (stale / "tmp-x" / "big.bin").write_bytes(b"x" * 1000)
    seen: list[int] = []
    stop = threading.Event()

    def watch():  # proves the submission did write its file before it was killed
        while not stop.is_set():
            seen.extend(p.stat().st_size for p in tmp.rglob("leftover.bin"))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        book = grade(subs, tmp_path / "gradebook", tests, timeout=60, call_timeout=600, jobs=1, echo=lambda *a: None)
    finally:
        stop.set()
        watcher.join()
    assert seen and max(seen) == 1 << 20
    assert "stopped at the 60s limit" in book["students"]["hog"]["error"]
    assert list(tmp.iterdir()) == [], list(tmp.rglob("*"))


@pytest.mark.slow
def test_results_do_not_depend_on_parallelism(graded, tmp_path):
    subs = tmp_path / "submissions"
    subs.mkdir()
    for name in ("solution.ipynb", "broken_cells"):
        source = graded["subs"] / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, subs / name)
    main(["grade", str(subs), "--out", str(tmp_path / "gb"), "--tests", str(graded["tests"]),
          "--call-timeout", str(CALL_TIMEOUT), "--jobs", "1"])
    alone = json.loads((tmp_path / "gb" / "gradebook.json").read_text())["students"]
    for student, entry in alone.items():
        assert entry["tests"] == graded["book"]["students"][student]["tests"]


def chapter_notebooks() -> list[Path]:
    """Every chapter notebook that holds exercises."""
    return [path for path in sorted((REPO / "chapters").glob("*/*.ipynb"))
            if any("exercise" in cell.metadata.get("tags", []) for cell in nbformat.read(path, as_version=4).cells)]


@pytest.fixture(scope="module")
def chapters_graded(tmp_path_factory):
    """Each chapter notebook as committed (the solutions) and as released, graded in one run
    against the real grading tests."""
    root = tmp_path_factory.mktemp("chapters")
    subs, out = root / "submissions", root / "gradebook"
    subs.mkdir()
    for path in chapter_notebooks():
        real = nbformat.read(path, as_version=4)
        nbformat.write(real, subs / f"{path.stem}_solution.ipynb")
        nbformat.write(release_notebook(real), subs / f"{path.stem}_release.ipynb")
    rc = main(["grade", str(subs), "--out", str(out), "--tests", str(REPO / "tests" / "grading"),
               "--chapters", str(REPO / "chapters"), "--jobs", "2"])
    return rc, json.loads((out / "gradebook.json").read_text())["students"]


@pytest.mark.slow
@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda path: path.parent.name)
def test_chapter_solutions_score_full_marks_and_release_zero(chapters_graded, path):
    rc, book = chapters_graded
    assert rc == 0
    solution, release = book[f"{path.stem}_solution"], book[f"{path.stem}_release"]
    assert solution["max"] >= 3, f"{path}: expected at least three graded points, got {solution}"
    assert solution["total"] == solution["max"], solution
    assert release["total"] == 0 and release["max"] == solution["max"] and release["error"] is None, release
    for test in release["tests"]:
        assert "NotImplementedError: Exercise" in test["message"], test


def test_every_chapter_with_exercises_is_graded():
    assert len(chapter_notebooks()) >= 2
    for path in chapter_notebooks():
        chapter = path.parent.name
        assert (REPO / "tests" / "grading" / f"test_{chapter}.py").exists(), f"{path} has exercises but no grading tests"


# ---------------------------------------------------------------- the release


def test_release_notebook_replaces_solutions_and_clears_outputs():
    nb = notebook(SOLUTIONS)
    nb.cells.append(nbformat.v4.new_markdown_cell("<!-- BEGIN SOLUTION -->\nA worked answer"))
    nb.cells.append(nbformat.v4.new_code_cell("print('worked answer code')"))
    nb.cells.append(nbformat.v4.new_markdown_cell("still the answer\n<!-- END SOLUTION -->"))
    nb.cells.append(nbformat.v4.new_code_cell("x = 1", execution_count=9,
                                              outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "1"})]))
    released = release_notebook(nb, name="test")
    text = json.dumps(released)
    for gone in ("BEGIN SOLUTION", "END SOLUTION", "F @ P @ F.mT", "Because y is Gaussian", "worked answer",
                 "HINT", "ran cell"):
        assert gone not in text, gone
    assert released.cells[0].source == "Exercise 4 asks why NIS is chi-square.\nNext: smoothing."
    stubs = [c.source for c in released.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(stubs) == 4
    assert '    raise NotImplementedError("Exercise 1: replace this line with your solution")' in stubs[0]
    assert '    raise NotImplementedError("Exercise 2: solve with S, never invert it; Joseph form for P")' in stubs[1]
    assert "def kf_update(x, P, z, H, R):" in stubs[1] and '"""Kalman update' in stubs[1]
    for source in stubs:
        compile(source, "stub", "exec")  # still valid Python
    assert all(c.outputs == [] and c.execution_count is None for c in released.cells if c.cell_type == "code")
    assert released.cells[-1].source == "x = 1"
    assert released.metadata["seqbook"] == {"chapter": "01_kalman"}
    assert len(nb.cells) == 9 and nb.cells[1].outputs  # the original is untouched


@pytest.mark.parametrize("cells, tags, match", [
    (["def f():\n    # BEGIN SOLUTION\n    return 1\n"], ["exercise"], "without a matching"),
    (["def f():\n    return 1\n    # END SOLUTION\n"], ["exercise"], "without a '# BEGIN SOLUTION'"),
    (["def f():\n    return 1\n"], ["exercise"], "has no '# BEGIN SOLUTION'"),
    (["def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n"], [], "not tagged 'exercise'"),
])
def test_release_refuses_broken_markers(cells, tags, match):
    nb = notebook(cells)
    nb.cells[1].metadata["tags"] = tags
    with pytest.raises(ValueError, match=match) as info:
        release_notebook(nb, name="ch.ipynb")
    assert "ch.ipynb, cell 1" in str(info.value)


def test_release_command_keeps_the_chapter_folders(tmp_path, capsys):
    chapters = tmp_path / "chapters"
    (chapters / "01_kalman").mkdir(parents=True)
    (chapters / "02_plain").mkdir()
    (chapters / "01_kalman" / ".ipynb_checkpoints").mkdir()
    nbformat.write(notebook(SOLUTIONS), chapters / "01_kalman" / "kalman.ipynb")
    nbformat.write(notebook(SOLUTIONS), chapters / "01_kalman" / ".ipynb_checkpoints" / "kalman-checkpoint.ipynb")
    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nbformat.write(plain, chapters / "02_plain" / "plain.ipynb")
    assert main(["release", str(chapters), "--out", str(tmp_path / "release")]) == 0
    written = sorted(p.relative_to(tmp_path / "release") for p in (tmp_path / "release").rglob("*.ipynb"))
    assert written == [Path("chapters/01_kalman/kalman.ipynb")]
    assert "1 notebook(s)" in capsys.readouterr().out
    released = nbformat.read(tmp_path / "release" / written[0], as_version=4)
    assert released.metadata["seqbook"]["chapter"] == "01_kalman"
    assert "BEGIN SOLUTION" not in json.dumps(released)


def test_release_of_the_real_chapter_notebook():
    assert REAL_NOTEBOOK.exists(), f"{REAL_NOTEBOOK} is missing"
    real = nbformat.read(REAL_NOTEBOOK, as_version=4)
    released = release_notebook(real, name=str(REAL_NOTEBOOK))
    assert released.metadata["seqbook"]["chapter"] == "01_kalman"
    stubs = [c.source for c in released.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(stubs) == sum("exercise" in c.metadata.get("tags", []) for c in real.cells) >= 4
    for k, (name, source) in enumerate(zip(("kf_predict", "kf_update", "rts_step", "nis"), stubs), start=1):
        assert f"def {name}(" in source and f'raise NotImplementedError("Exercise {k}:' in source
    assert "SOLUTION -->" not in json.dumps(released) and "# BEGIN SOLUTION" not in json.dumps(released)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in released.cells if c.cell_type == "code")


# ---------------------------------------------------------------- the kernel layers on their own

KERNEL_PROBE = r'''
import json, os, socket, sys
from seqbook.grading import sandbox

inside, outside = sys.argv[1], sys.argv[2]
abi = sandbox.landlock(inside, sandbox.read_paths())
on = sandbox.seccomp(os.getpid())
results = {"landlock": abi, "seccomp": on}

def attempt(name, fn):
    try:
        fn()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = exc.errno

attempt("write inside", lambda: open(os.path.join(inside, "ok.txt"), "w").write("fine"))
attempt("write outside", lambda: open(outside, "w").write("pwned"))
attempt("read outside", lambda: open(outside).read())
attempt("remove outside", lambda: os.remove(outside))
attempt("fork", lambda: os._exit(0) if os.fork() == 0 else None)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("socket", lambda: socket.socket())
attempt("signal the parent", lambda: os.kill(os.getppid(), 0))
attempt("signal itself", lambda: os.kill(os.getpid(), 0))
print(json.dumps(results))
'''


def test_kernel_layers_hold_without_the_audit_hook(tmp_path):
    """Landlock and seccomp alone (no audit hook, no torch): what native code would meet."""
    import errno
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("the kernel layers are Linux-only")
    inside, outside = tmp_path / "inside", tmp_path / "outside.txt"
    inside.mkdir()
    outside.write_text("the grader's file")
    probe = subprocess.run([sys.executable, "-c", KERNEL_PROBE, str(inside), str(outside)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    r = json.loads(probe.stdout)
    if not r["landlock"]:
        pytest.skip("this kernel has no Landlock")
    assert r["write inside"] == "allowed" and r["signal itself"] == "allowed"
    assert r["write outside"] == r["read outside"] == r["remove outside"] == errno.EACCES
    assert outside.read_text() == "the grader's file"
    if platform.machine() == "x86_64":
        assert r["seccomp"] is True
        assert r["fork"] == r["exec"] == r["socket"] == r["signal the parent"] == errno.EPERM
