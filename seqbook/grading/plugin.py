"""The pytest plugin behind grading tests: ``@pytest.mark.points(n)`` and the ``submission`` fixture.

A grading test is a plain pytest test::

    @pytest.mark.points(2)
    def test_kf_predict(submission):
        x_pred, P_pred = submission.kf_predict(x, P, F, Q)
        ...

``submission`` is a :class:`~seqbook.grading.submission.Submission`: its
attributes are the student's functions, each running in the sandbox.  The
plugin records, per test, the points earned (all of ``n`` if the test passes,
0 otherwise), the outcome and a one-line failure message, and writes them as
JSON to ``--grading-results`` when the session ends.  With ``--collect-only``
it writes the list of tests and their points, which is how the grader learns
the maximum before any student code runs.

Loaded with ``-p seqbook.grading.plugin`` by :mod:`seqbook.grading.grade`, one
pytest process per submission.  To try a chapter's grading tests on one
notebook by hand::

    python -m pytest -p seqbook.grading.plugin -o addopts="" tests/grading/test_01_kalman.py \\
        --grading-submission chapters/01_kalman/kalman.ipynb
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .submission import Submission, SubmissionError

MAX_MESSAGE = 500


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

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
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
        if report.when == "call" and report.passed:
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
