"""Which implementation of an operation runs, and the Triton interpreter switch.

Every public operation takes ``backend``:

- ``"reference"``: the readable PyTorch code, on any device;
- ``"triton"``: the Triton kernel, compiled on a CUDA device, or run by the
  Triton interpreter (``TRITON_INTERPRET=1``) on a machine without a GPU;
- ``"auto"``: the kernel for CUDA tensors, the reference otherwise.

The interpreter must be chosen before Triton itself is imported: ``triton.language``
decorates its own helpers (``tl.zeros``, ``tl.sum``, ...) at import time, and
``@triton.jit`` reads the switch when it decorates. So this module, which
``import seqbook`` imports first, switches the interpreter on when there is no
GPU, and kernel modules are imported only on first use, through :func:`kernels`.
Import ``seqbook`` before ``triton`` on a machine without a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton")

# Decided once, before anything imports triton (see the module docstring).
_TRITON_IMPORTED_FIRST = "triton" in sys.modules
if not torch.cuda.is_available() and not _TRITON_IMPORTED_FIRST:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors).

    The interpreter is on when the user asked for it (``TRITON_INTERPRET=1``),
    or when no CUDA device is present, since then nothing can be compiled.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """Turn ``backend`` into ``"reference"`` or ``"triton"`` for these tensors.

    Raises ``ValueError`` for an unknown name, and for ``"triton"`` on tensors
    it cannot run on (CPU tensors on a machine whose kernels are compiled).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda else "reference"
    if backend == "triton" and not on_cuda and not interpreting():
        raise ValueError(
            "backend='triton' got CPU tensors, but on this machine the Triton kernels are "
            "compiled for CUDA: move the tensors to 'cuda', use backend='reference', or "
            "set TRITON_INTERPRET=1 before importing seqbook to run the interpreter"
        )
    return backend


def kernels(name: str) -> ModuleType:
    """Import ``seqbook.kernels.<name>`` (on first use; see the module docstring)."""
    if interpreting() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton kernels need the Triton interpreter on a machine without a GPU, but triton was "
            "imported before seqbook, so the interpreter could not be switched on: import seqbook "
            "first, or set TRITON_INTERPRET=1 before starting Python"
        )
    return importlib.import_module(f"seqbook.kernels.{name}")
