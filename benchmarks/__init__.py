"""seqbook's GPU benchmark suite.

``python -m benchmarks.run`` (``make bench``) checks every registered operation against
its float64 reference on the GPU, measures the GPU's ceilings, times every
implementation of every operation, writes ``benchmarks/results/<date>-<gpu>.json`` in
the schema of shared/GPU.md and prints a short table. ``python -m benchmarks.plot``
draws time against length from those files.

- :mod:`benchmarks.suite`: the machinery (``Op``, ``Impl``, the registry, ceilings,
  timing, the result file);
- :mod:`benchmarks.scan`: the diagonal linear recurrence (``scan.fwd``, ``scan.fwdbwd``);
- :mod:`benchmarks.ssm_kernel`: the SSM convolution kernel (a standalone script).

Adding an operation is one module that calls :func:`benchmarks.suite.register` and one
line in ``benchmarks.run.OP_MODULES``; see chapters/appendix_kernels.md.
"""
