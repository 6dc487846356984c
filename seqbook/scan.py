r"""The diagonal linear recurrence, three ways: a loop, a parallel scan, a Triton kernel.

.. math::

    h_t = a_t \odot h_{t-1} + b_t, \qquad t = 0, \dots, L-1, \qquad h_{-1} = h_\text{init} \ (\text{the argument } h0\text{; zeros if not given}),

independently for every batch element and channel. It is the primitive under a
discretized diagonal SSM (:math:`a = \bar A`, :math:`b = \bar B u`), the selective
scan of Mamba (:math:`a = e^{\Delta A}` varies with the input), gated linear
attention and RWKV's decays.

Glossary (symbol -> shape)
--------------------------
::

    a       (batch, length, channels)   the decay a_t, multiplies the previous state
    b       (batch, length, channels)   the input b_t, added to the state
    h0      (batch, channels)           h_init = h_{-1}, the state before the first step (zeros if None);
                                        not the first output h_0
    h       (batch, length, channels)   all states h_0 ... h_{L-1}
    h_last  (batch, channels)           the final state h_{L-1} (h0 itself when length is 0)

Three implementations with one signature ``(a, b, h0=None) -> (h, h_last)``:

- :func:`linear_recurrence_loop`: the recurrence as written, one step per token. It
  is the lesson, and a poor program on a GPU: ``L`` sequential steps, each a few tiny
  launches that read and write the whole state.
- :func:`linear_recurrence_parallel`: a work-efficient parallel scan in PyTorch
  (Blelloch 1990), depth :math:`O(\log L)`, built on the combine operator explained in
  its docstring (Martin and Cundy 2018 apply it to linear RNNs).
- :mod:`seqbook.kernels.scan`: the Triton kernel, forward and backward; see its
  docstring for the design.

The public entry :func:`linear_recurrence` validates its inputs and picks one with
``backend`` (see :mod:`seqbook.backend`).
"""

from __future__ import annotations

import torch

from . import backend as _backend

#: dtypes the readable forms accept (the same code runs on complex states, e.g. S4D's).
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
#: dtypes the Triton kernel accepts; it accumulates in float32 whatever the input.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_recurrence(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""All states of :math:`h_t = a_t \odot h_{t-1} + b_t`, and the last one.

    Args:
        a: ``(batch, length, channels)``, the decays :math:`a_t`.
        b: ``(batch, length, channels)``, the inputs :math:`b_t`; same dtype and device as ``a``.
        h0: ``(batch, channels)`` or ``None`` (zeros), the state :math:`h_{-1}` before the first step.
        backend: ``"reference"`` (:func:`linear_recurrence_parallel`), ``"triton"``
            (:mod:`seqbook.kernels.scan`; compiled on CUDA, interpreted on a machine
            without a GPU), or ``"auto"``: the kernel for CUDA tensors of a dtype it
            supports (float32, bfloat16, float16), the reference otherwise (CPU
            tensors, float64, complex).

    Returns:
        ``(h, h_last)``: ``h`` ``(batch, length, channels)`` and ``h_last = h[:, -1]``
        ``(batch, channels)``, in the inputs' dtype. Differentiable in ``a``, ``b`` and ``h0``.

    The reference is the parallel scan rather than the loop: the two agree to rounding
    (the tests check it in float64), and on a GPU the loop costs ``2 L`` tiny launches
    where the scan costs about fourteen per level of its ``log2 L`` levels (on an H100 at
    ``B=4, L=4096, D=2048``: about 100 ms against 2 ms), which makes it usable as the
    reference at the benchmark's sizes and under autograd.

    Non-contiguous inputs (a slice, a transpose) are accepted: the kernel copies them
    to contiguous memory first, as PyTorch's own operations do, at the cost of one
    extra pass over that input. Mismatched shapes, dtypes or devices raise
    ``ValueError``/``TypeError`` naming the argument.
    """
    _check_inputs(a, b, h0)
    tensors = (a, b) if h0 is None else (a, b, h0)
    chosen = _backend.resolve(backend, *tensors)
    if chosen == "triton" and a.dtype not in KERNEL_DTYPES:
        if backend == "auto":
            chosen = "reference"  # float64 and complex have no kernel: the reference is still right
        else:
            raise TypeError(
                f"linear_recurrence(backend='triton') supports dtypes {_names(KERNEL_DTYPES)} "
                f"(float32 accumulation), got {a.dtype}: use backend='reference' for it"
            )
    if chosen == "triton" and a.numel() == 0:
        chosen = "reference"  # nothing to launch: empty batch, length or channels
    if chosen == "reference":
        return linear_recurrence_parallel(a, b, h0)
    return _backend.kernels("scan").linear_recurrence(a, b, h0)


def linear_recurrence_loop(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The recurrence as written: :math:`h_t = a_t \odot h_{t-1} + b_t`, one step at a time.

    Shapes as in :func:`linear_recurrence` (the module glossary); no validation.
    This is the definition every other form is tested against. Each step depends on
    the one before, so the ``L`` steps cannot overlap: on a GPU this is ``L`` rounds
    of tiny launches, each reading and writing a ``(batch, channels)`` slice.
    """
    batch, length, channels = a.shape
    h = torch.zeros(batch, channels, dtype=a.dtype, device=a.device) if h0 is None else h0
    states = []
    for t in range(length):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    if not states:
        return a.new_empty(batch, 0, channels), h
    return torch.stack(states, dim=1), h


def linear_recurrence_parallel(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The same states by a parallel (associative) scan, in :math:`O(\log L)` dependent steps.

    Shapes as in :func:`linear_recurrence`; no validation.

    **The combine.** One step is the affine map :math:`h \mapsto a_t h + b_t`, which we
    write as the pair :math:`(a_t, b_t)`. Doing step 1 and then step 2 is again an
    affine map,

    .. math::

        h \mapsto a_2 (a_1 h + b_1) + b_2 = (a_1 a_2)\, h + (a_2 b_1 + b_2),
        \qquad\text{so}\qquad
        (a_1, b_1) \circ (a_2, b_2) = (a_1 a_2,\; a_2 b_1 + b_2).

    Composition of maps is associative, hence so is :math:`\circ` (it is not
    commutative: the order of the steps matters). The composite of steps
    :math:`0..t` is :math:`(A_t, B_t) = (a_0 \cdots a_t,\ h_t \text{ from } h_{-1} = 0)`,
    and with an initial state :math:`h_t = A_t h_\text{init} + B_t`. Computing every prefix
    :math:`(a_0, b_0) \circ \cdots \circ (a_t, b_t)` of an associative operator is a
    *scan* (prefix sum), and scans parallelize (Blelloch 1990, "Prefix sums and their
    applications"; Martin and Cundy 2018, "Parallelizing linear recurrent neural nets
    over sequence length", who apply exactly this combine to linear RNNs).

    **The algorithm** is Blelloch's work-efficient scan, written recursively:

    1. *Up-sweep*: combine neighbours :math:`(0,1), (2,3), \dots`: a sequence half as
       long whose elements are two steps each.
    2. *Recurse* on it: its prefixes are the prefixes of the original that end at the
       odd positions :math:`1, 3, 5, \dots`.
    3. *Down-sweep*: the prefix at an even position :math:`2k` is the odd prefix just
       before it combined with one more step, :math:`P_{2k} = P_{2k-1} \circ (a_{2k}, b_{2k})`;
       position 0 is its own prefix.

    Each level does :math:`O(L)` work on a sequence half as long as the level above, so
    the total work is :math:`O(L)` like the loop, in :math:`2\log_2 L` levels of whole-tensor
    operations. (Hillis and Steele's scan is simpler, combining every element with the one
    :math:`2^k` places back at step :math:`k`, but does :math:`O(L \log L)` work.)
    Rounding differs from the loop's because the products are grouped differently; both
    are accurate (the tests compare them in float64).
    """
    batch, length, channels = a.shape
    if length == 0:
        h_last = torch.zeros(batch, channels, dtype=a.dtype, device=a.device) if h0 is None else h0
        return a.new_empty(batch, 0, channels), h_last
    A, H = _scan(a, b)
    if h0 is not None:
        H = A * h0[:, None, :] + H  # h_t = A_t h_init + B_t
    return H, H[:, -1]


def _scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of the pairs ``(a_t, b_t)`` along dim 1 under the combine; returns ``(A, B)``."""
    length = a.shape[1]
    if length == 1:
        return a, b
    # 1. Up-sweep: pair (0,1), (2,3), ...; an odd last element waits for the down-sweep.
    a_left, a_right = a[:, 0 : length - 1 : 2], a[:, 1::2]
    b_left, b_right = b[:, 0 : length - 1 : 2], b[:, 1::2]
    # 2. Prefixes of the pairs = prefixes of the original ending at positions 1, 3, 5, ...
    A_odd, B_odd = _scan(a_left * a_right, a_right * b_left + b_right)
    # 3. Down-sweep: position 2k = (prefix at 2k-1) then step 2k.
    a_even, b_even = a[:, 2::2], b[:, 2::2]
    n = a_even.shape[1]
    A = torch.empty_like(a)
    B = torch.empty_like(b)
    A[:, 1::2], B[:, 1::2] = A_odd, B_odd
    A[:, 0], B[:, 0] = a[:, 0], b[:, 0]
    A[:, 2::2] = A_odd[:, :n] * a_even
    B[:, 2::2] = a_even * B_odd[:, :n] + b_even
    return A, B


# --------------------------------------------------------------------------------------
# Validation at the public entry
# --------------------------------------------------------------------------------------


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_inputs(a, b, h0) -> None:
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is None and name == "h0":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"linear_recurrence: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in REFERENCE_DTYPES:
            raise TypeError(
                f"linear_recurrence: {name} must be a floating (or complex) tensor, one of "
                f"{_names(REFERENCE_DTYPES)}; got {x.dtype}"
            )
    if a.dim() != 3:
        raise ValueError(f"linear_recurrence: a must be (batch, length, channels), got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(
            f"linear_recurrence: b must have the shape of a, (batch, length, channels) = {tuple(a.shape)}, "
            f"got {tuple(b.shape)}"
        )
    batch, _, channels = a.shape
    if h0 is not None and h0.shape != (batch, channels):
        raise ValueError(
            f"linear_recurrence: h0 must be (batch, channels) = ({batch}, {channels}), got shape {tuple(h0.shape)}"
        )
    for name, x in (("b", b), ("h0", h0)):
        if x is None:
            continue
        if x.dtype != a.dtype:
            raise TypeError(f"linear_recurrence: {name} must have the dtype of a ({a.dtype}), got {x.dtype}")
        if x.device != a.device:
            raise ValueError(f"linear_recurrence: {name} must be on the device of a ({a.device}), got {x.device}")
