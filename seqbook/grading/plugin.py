"""The pytest plugin behind grading tests: ``@pytest.mark.points(n)`` and the ``submission`` fixture.

A grading test is a plain pytest test::

    @pytest.mark.points(2)
    def test_kf_predict(submission):
        x_pred, P_pred = submission.kf_predict(x, P, F, Q)
        ...

``submission`` is a :class:`~seqbook.grading.submission.Submission`: its
attributes are the student's functions, each running in the sandbox.  The
plugin records, per test, the points earned, the outcome and a one-line
failure message, and writes them as JSON to ``--grading-results`` when the
session ends.  With ``--collect-only`` it writes the list of tests and their
points, which is how the grader learns the maximum before any student code runs.

Partial credit: a test that takes the ``credit`` fixture splits its points over
cases; each ``with credit.case("what it probes"):`` block that fails costs its
share (``weight``), and the others still count::

    @pytest.mark.points(3)
    def test_discretize(submission, credit):
        for shape in SHAPES:
            with credit.case(f"A of shape {shape}"):
                ...

Without ``credit``, a test earns all of ``n`` if it passes and 0 otherwise.

Library functions an exercise must write itself: a test module may declare::

    FORBIDDEN = {"kf_predict": ["seqbook.kalman.*"],            # every function of the module
                 "woodbury_resolvent": ["aten::linalg_inv_ex"]}  # an ATen operator, however reached
    FORBIDDEN_WHY = {"woodbury_resolvent": "Exercise 4 is the Woodbury identity, without an N x N solve"}

While the grader calls the student's ``kf_predict`` (and while the exercise
cells run, for every name listed anywhere), those library functions raise a
``PermissionError`` that names the function and the exercise; the library's
own code may still call them (see :func:`seqbook.grading.sandbox.install_forbidden`).
A pattern that matches no library function is an error at collection.

Loaded with ``-p seqbook.grading.plugin`` by :mod:`seqbook.grading.grade`, one
pytest process per submission.  To try a chapter's grading tests on one
notebook by hand::

    python -m pytest -p seqbook.grading.plugin -o addopts="" tests/grading/test_01_kalman.py \\
        --grading-submission chapters/01_kalman/kalman.ipynb
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from . import sandbox as _sandbox
from .submission import Submission, SubmissionError

MAX_MESSAGE = 500


class Credit:
    """Partial credit for one test: its points split over the cases that run under it."""

    def __init__(self):
        self.cases: list[tuple[str, float, str | None]] = []  # (label, weight, failure message or None)

    @contextlib.contextmanager
    def case(self, label: str, weight: float = 1.0):
        """A case worth ``weight`` shares of the test's points; a failure inside is recorded, not raised."""
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")
        try:
            yield
        except (AssertionError, SubmissionError, Exception) as exc:  # noqa: B014 - the student's errors too
            message = str(exc) if isinstance(exc, (AssertionError, SubmissionError)) and str(exc) \
                else f"{type(exc).__name__}: {exc}"
            self.cases.append((label, float(weight), " ".join(message.split())))
        else:
            self.cases.append((label, float(weight), None))

    def fraction(self) -> float:
        total = sum(w for _, w, _ in self.cases)
        return sum(w for _, w, failed in self.cases if failed is None) / total if total else 1.0

    def failures(self) -> list[str]:
        """One entry per distinct failure message, naming the cases that gave it."""
        grouped: dict[str, list] = {}  # the message with its case left out -> (first message, labels)
        for label, _, failed in self.cases:
            if failed is not None:
                message = failed if label in failed else f"{label}: {failed}"
                grouped.setdefault(failed.replace(label, ""), [message, []])[1].append(label)
        return [first + (f" (the same in: {'; '.join(labels[1:])})" if len(labels) > 1 else "")
                for first, labels in grouped.values()]


def forbidden_rules(modules) -> dict:
    """FORBIDDEN and FORBIDDEN_WHY of the grading test modules, checked: student function ->
    {"patterns": [...], "why": str}.  UsageError for a malformed entry or a pattern matching nothing."""
    rules: dict[str, dict] = {}
    functions = None
    for module in modules:
        declared = getattr(module, "FORBIDDEN", None)
        if declared is None:
            continue
        why = getattr(module, "FORBIDDEN_WHY", {}) or {}
        where = getattr(module, "__file__", module.__name__)
        if not isinstance(declared, dict) or not isinstance(why, dict):
            raise pytest.UsageError(f"{where}: FORBIDDEN (and FORBIDDEN_WHY) must be dicts keyed by function name")
        if functions is None:
            functions = _sandbox.library_functions(_sandbox.load_library())
        for name, patterns in declared.items():
            if not isinstance(name, str) or isinstance(patterns, str) or \
                    not all(isinstance(p, str) for p in patterns):
                raise pytest.UsageError(f"{where}: FORBIDDEN[{name!r}] must be a list of patterns "
                                        "('seqbook.module.function', wildcards allowed, or 'aten::op')")
            _, _, unmatched = _sandbox.match_forbidden(patterns, functions)
            if unmatched:
                raise pytest.UsageError(f"{where}: FORBIDDEN[{name!r}]: {', '.join(unmatched)} matches no function "
                                        "of seqbook")
            entry = rules.setdefault(name, {"patterns": [], "why": ""})
            entry["patterns"] += list(patterns)
            entry["why"] = str(why.get(name, entry["why"]))
    return rules


def pytest_addoption(parser):
    group = parser.getgroup("seqbook-grading", "seqbook grading")
    group.addoption("--grading-submission", help="the submitted notebook (.ipynb) to grade")
    group.addoption("--grading-results", help="write per-test points and messages to this JSON file")
    group.addoption("--grading-call-timeout", type=float, default=10.0,
                    help="seconds for each call into the student's code, and for each exercise cell")
    group.addoption("--grading-memory-mb", type=int, default=4096, help="data memory limit of the sandbox")
    group.addoption("--grading-cpu-seconds", type=int, default=300, help="CPU time limit of the sandbox")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): how many points a grading test is worth")
    config.pluginmanager.register(_Recorder(config), "seqbook-grading-recorder")


def _message(excinfo) -> str:
    exc = excinfo.value
    if isinstance(exc, (SubmissionError, AssertionError)) and str(exc):
        text = str(exc)
    elif isinstance(exc, pytest.fail.Exception):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class _Recorder:
    def __init__(self, config):
        self.config = config
        self.tests: dict[str, dict] = {}  # nodeid -> record, in collection order
        self.submission: Submission | None = None
        self.forbid: dict[str, dict] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        # FORBIDDEN first: a typo there must fail the collection (no tests listed), not every submission.
        modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
        self.forbid = forbidden_rules(modules.values())
        problems = []
        for item in items:
            marker = item.get_closest_marker("points")
            if marker is None or len(marker.args) != 1 or not isinstance(marker.args[0], (int, float)) \
                    or marker.args[0] <= 0:
                problems.append(item.nodeid)
                continue
            self.tests[item.nodeid] = {"test": item.name, "points": 0, "max_points": marker.args[0],
                                       "outcome": "not run", "message": ""}
        if problems:
            raise pytest.UsageError(
                "every grading test needs @pytest.mark.points(n) with n > 0; missing or wrong on: "
                + ", ".join(problems)
            )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        record = self.tests.get(item.nodeid)
        if record is None:
            return
        credit = getattr(item, "_seqbook_credit", None)
        if report.when == "call" and report.passed and credit is not None and credit.failures():
            # Some cases failed: their share of the points is lost, the rest earned.
            failed = sum(1 for case in credit.cases if case[2] is not None)
            points = round(record["max_points"] * credit.fraction(), 2)
            text = f"{failed} of {len(credit.cases)} cases failed: " + " | ".join(credit.failures())
            text = text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
            record.update(points=points, outcome="partial" if points > 0 else "failed", message=text)
            report.outcome, report.longrepr = "failed", text  # so a run by hand shows it too
        elif report.when == "call" and report.passed:
            record.update(points=record["max_points"], outcome="passed", message="")
        elif report.failed and record["outcome"] not in ("failed", "error"):
            # A failure in setup (the sandbox did not start) is an error; in the test, a failure.
            record.update(points=0, outcome="failed" if report.when == "call" else "error",
                          message=_message(call.excinfo) if call.excinfo else report.longreprtext[-MAX_MESSAGE:])
        elif report.failed and report.when == "teardown":
            record.update(points=0)
        elif report.skipped and report.when in ("setup", "call"):
            record.update(points=0, outcome="skipped", message=_message(call.excinfo) if call.excinfo else "")

    def pytest_runtest_logfinish(self, nodeid, location):
        # After every test: if the whole run is killed at its time limit, the
        # tests that finished keep their points.
        self._write()

    def pytest_sessionfinish(self, session, exitstatus):
        self._write()

    def _write(self):
        path = self.config.getoption("--grading-results")
        if not path:
            return
        sub = self.submission
        data = {
            "tests": list(self.tests.values()),
            "cells": sub.cells() if sub is not None and sub.layers else [],
            "sandbox": sub.layers if sub is not None else {},
            "functions": sub.functions if sub is not None else [],
        }
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


@pytest.fixture(scope="session")
def submission(request):
    """The student's exercise functions, running in a sandbox (see :class:`Submission`)."""
    config = request.config
    path = config.getoption("--grading-submission")
    if not path:
        raise pytest.UsageError("grading tests need --grading-submission NOTEBOOK.ipynb")
    recorder = config.pluginmanager.get_plugin("seqbook-grading-recorder")
    try:
        sub = Submission(
            path,
            call_timeout=config.getoption("--grading-call-timeout"),
            memory_mb=config.getoption("--grading-memory-mb"),
            cpu_seconds=config.getoption("--grading-cpu-seconds"),
            forbid=recorder.forbid,
        )
    except Exception as exc:  # not a notebook nbformat can read
        raise SubmissionError(f"cannot read the notebook: {type(exc).__name__}: {exc}") from None
    recorder.submission = sub
    try:
        sub._ensure_started()  # runs the cells now: a sandbox that cannot start is an error, not a failure
    except SubmissionError:
        sub.close()
        raise
    yield sub
    sub.close()


@pytest.fixture
def credit(request):
    """Partial credit inside one test: ``with credit.case("label", weight=1): ...`` (see the module docstring)."""
    tracker = Credit()
    request.node._seqbook_credit = tracker
    return tracker
