"""Which implementation of an operation runs, and the Triton interpreter switch.

Every public operation takes ``backend``:

- ``"reference"``: the readable PyTorch code, on any device;
- ``"triton"``: the Triton kernel, compiled on a CUDA device, or run by the
  Triton interpreter (``TRITON_INTERPRET=1``) on a machine without a GPU;
- ``"auto"``: the kernel for CUDA tensors, the reference otherwise.

The interpreter must be chosen before any ``@triton.jit`` function is decorated,
so kernel modules are never imported at package import time: :func:`kernels`
imports them on first use, after setting the switch.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton")


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
    """Import ``seqbook.kernels.<name>``, switching the interpreter on first if needed."""
    if interpreting():
        os.environ["TRITON_INTERPRET"] = "1"
    return importlib.import_module(f"seqbook.kernels.{name}")
