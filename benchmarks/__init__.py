"""seqbook's GPU benchmark suite.

``python -m benchmarks.run`` (``make bench``) checks every registered operation against
its float64 reference on the GPU, measures the GPU's ceilings, times every
implementation of every operation, writes ``benchmarks/results/<date>-<gpu>.json`` in
the schema of shared/GPU.md and prints a short table. ``python -m benchmarks.plot``
draws time against length from those files.

- :mod:`benchmarks.suite`: the machinery (``Op``, ``Impl``, the registry, ceilings,
  timing, the result file);
- :mod:`benchmarks.scan`: the diagonal linear recurrence (``scan.fwd``, ``scan.fwdbwd``);
- :mod:`benchmarks.selective_scan`: Mamba's selective scan (``selective_scan.fwd``, ``selective_scan.fwdbwd``)
  and Mamba-2's chunked SSD forward (``ssd.fwd``);
- :mod:`benchmarks.ssm_kernel`: the diagonal SSM convolution kernel (``ssm_kernel.*``,
  and its core alone, ``vandermonde.*``);
- :mod:`benchmarks.cauchy`: the Cauchy kernel of S4 (``cauchy.fwd``, ``cauchy.fwdbwd``);
- :mod:`benchmarks.attention`: softmax attention, our FlashAttention kernel against PyTorch's SDPA
  (``attention.fwd``, ``attention.fwdbwd``).
- :mod:`benchmarks.linear_attention`: causal linear attention, our chunked kernel against
  flash-linear-attention's (``linear_attention.fwd``, ``.fwdbwd``, ``.decay_fwd``, ``.decay_fwdbwd``).
- :mod:`benchmarks.gated`: chapter 7's recurrences against fla's kernels (``gla``, ``rwkv6``,
  ``delta_rule``, ``rwkv7``, ``rwkv4``; ``.fwd`` and ``.fwdbwd`` each).

``--lengths`` times only the length-sweep shapes (one batch of 16 heads of 128, or 2048
channels, at L = 1k ... 64k) that the book's time-against-length plots read; other runs
leave them out.

``python -m benchmarks.run --list`` prints the registry without a GPU, and
``python -m benchmarks.compile_check`` compiles every kernel for sm_90 without one
(:mod:`benchmarks.compile_check`).

Adding an operation is one module that calls :func:`benchmarks.suite.register` and one
line in ``benchmarks.run.OP_MODULES``; see chapters/appendix_kernels.md.
"""
