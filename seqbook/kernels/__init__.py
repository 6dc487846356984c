"""Triton kernels, one module per operation.

Never import these directly at package import time: use
:func:`seqbook.backend.kernels`, which switches the Triton interpreter on first
when there is no GPU (it must be on before any kernel is decorated).
"""
