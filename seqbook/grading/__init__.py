"""Releasing exercises to students, and grading their notebooks in a sandbox.

- :mod:`~seqbook.grading.release`: exercise cells (code cells tagged ``exercise``,
  solutions between ``# BEGIN SOLUTION`` / ``# END SOLUTION``) and the student
  release (solutions replaced by ``raise NotImplementedError("Exercise N: ...")``,
  outputs cleared);
- :mod:`~seqbook.grading.grade`: a folder of submissions -> ``gradebook.csv`` and
  ``gradebook.json``, one pytest process per notebook;
- :mod:`~seqbook.grading.plugin`: the pytest plugin (``@pytest.mark.points(n)``,
  the ``submission`` fixture) used by ``tests/grading/test_<chapter>.py``;
- :mod:`~seqbook.grading.submission` and :mod:`~seqbook.grading.sandbox`: the
  trusted proxy and the untrusted process that runs the student's code;
- :mod:`~seqbook.grading.checks`: comparisons with messages a student can act on.

Command line: ``python -m seqbook.grading release chapters --out release`` and
``python -m seqbook.grading grade SUBMISSIONS --out gradebook`` (``make release``,
``make grade SUBMISSIONS=...``).  The instructors' page of the book explains
the whole workflow and what the sandbox does and does not protect against.
"""

from .grade import grade
from .release import exercise_sources, release_notebook, release_tree
from .submission import Submission, SubmissionError

__all__ = ["grade", "release_notebook", "release_tree", "exercise_sources", "Submission", "SubmissionError"]
