"""seqbook: the library behind a runnable textbook on sequence models.

Every core operation has a readable implementation (plain PyTorch, written to be
read beside the math) and a Triton kernel with the same signature; the public
entry of each operation takes ``backend="auto" | "reference" | "triton"``
(see :mod:`seqbook.backend`).

Modules, one per topic:

- :mod:`seqbook.kalman`  linear-Gaussian state space models: filter, smoother, parallel filter
- :mod:`seqbook.ssm`     continuous-time SSMs, discretization, recurrent and convolutional views
- :mod:`seqbook.scan`    the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``
- :mod:`seqbook.hippo`   HiPPO matrices (LegT, LegS, LagT, FouT), online projection, NPLR form
- :mod:`seqbook.s4`      the Cauchy kernel, S4's kernel (Woodbury, roots of unity), S4D initializations
- :mod:`seqbook.mamba`   Mamba's selective scan (loop, parallel, kernel) and SSD (quadratic, chunked, kernel)
- :mod:`seqbook.nn`      S4D and S4 layers, residual block, sequence and language models with a pluggable mixer
- :mod:`seqbook.tasks`   seeded synthetic tasks: adding problem, delayed recall
- :mod:`seqbook.train`   a small deterministic training loop and evaluation
- :mod:`seqbook.corpus`  the shipped text (Shakespeare), characters <-> ids, language-model batches
- :mod:`seqbook.backend` which implementation runs, and the Triton interpreter switch
- :mod:`seqbook.grading` releasing exercises and grading submissions
"""

__version__ = "0.1.0"

# Imported first so that, without a GPU, the Triton interpreter is switched on
# before anything imports triton (see seqbook.backend).
from . import backend  # noqa: E402,F401
