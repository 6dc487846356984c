"""Shared test setup.

``seqbook`` is imported before anything else so that, on a machine without a GPU,
the Triton interpreter is switched on before ``triton`` is first imported
(see ``seqbook.backend``); pytest-xdist workers import every test module.

Numerical tests compare with ``tests/compare.py``'s ``assert_near`` (``from compare import
assert_near``: this folder is on ``sys.path`` under pytest's default import mode), whose
docstring says how tolerances are fitted to the dtype and the reduction.
"""

import seqbook  # noqa: F401  (must come first)
import pytest
import torch

#: Devices the kernel tests run on: the interpreter on CPU, compiled kernels on CUDA.
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
