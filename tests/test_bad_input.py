"""Every public operation against the inputs a user gets wrong, or that are legitimately empty.

For each public operation with a ``backend`` argument, on each backend it has (the readable
reference, and the Triton kernel where there is one: interpreted on a machine without a GPU,
compiled on CUDA; ``grep -n "backend" seqbook/*.py`` lists them):

- an **empty batch** and an **empty length** return correctly shaped, empty outputs (and, at
  length 0, the initial state as the final one), on both backends;
- a **wrong dtype** (an integer tensor in any tensor argument) raises ``TypeError`` naming
  that argument;
- a **wrong device** (any tensor argument on another device than the others) raises
  ``ValueError`` naming it and saying "device". On a CPU-only machine the other device is
  ``"meta"`` (tensors with shapes and no data: the check must come before any computation);
  with a GPU, the inputs live on CUDA and the odd one out is on the CPU, the mistake a user
  actually makes, and on "meta" too.

Each operation is described once (:class:`Op`): how to build its arguments at a given batch
and length, how to call it, and the shapes of its results.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import pytest
import torch

from seqbook import attention, linear_attention, mamba, rwkv, s4, scan, ssm

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
#: where the odd argument goes in the wrong-device test
OTHER_DEVICES = ["meta"] + (["cpu"] if ON_GPU else [])
F32, C64 = torch.float32, torch.complex64


def rand(*shape, dtype=F32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    if dtype.is_complex:
        real = torch.randn(*shape, 2, generator=gen)
        return torch.complex(real[..., 0], real[..., 1]).to(device=device, dtype=dtype)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


@dataclasses.dataclass
class Op:
    """``make(batch, length)`` -> the tensor arguments by name (None for an optional one left
    out); ``call(backend=..., **tensors)`` -> the result; ``shapes(batch, length)`` -> the
    result's shapes (a tuple of shapes for a tuple of results, nested as they are); ``state``:
    the names of the arguments that make the initial state, and the index of the result that
    must equal it at length 0, if any; ``labels``: the name an error message gives an argument
    that is not its own (RWKV-4's state comes as a tuple, one argument).
    ``empty_length``: None where length 0 is a valid, empty sequence, else the ``match`` of
    the ``ValueError`` it raises (a kernel generator asked for zero taps). ``backends``: those
    it has (an operation with no kernel yet is tested through its reference only)."""

    make: Callable[[int, int], dict]
    call: Callable[..., object]
    shapes: Callable[[int, int], tuple]
    state: tuple[tuple[str, ...], int] | None = None
    labels: dict = dataclasses.field(default_factory=dict)
    empty_length: str | None = None
    backends: tuple[str, ...] = ("reference", "triton")


# Sizes: heads/channels/state small, head dims 16 (the smallest the kernels take).
H, N, D, P = 2, 4, 16, 16

OPS = {
    "scan.linear_recurrence": Op(
        make=lambda b, l: dict(a=rand(b, l, 3).sigmoid(), b=rand(b, l, 3, seed=1), h0=rand(b, 3, seed=2)),
        call=lambda backend, **t: scan.linear_recurrence(t["a"], t["b"], t["h0"], backend=backend),
        shapes=lambda b, l: ((b, l, 3), (b, 3)),
        state=(("h0",), 1),
    ),
    "ssm.vandermonde_kernel": Op(  # batch: the channels H; length: the taps
        make=lambda b, l: dict(W=rand(b, N, dtype=C64), log_A_bar=-rand(b, N, dtype=C64, seed=1).abs()),
        call=lambda backend, length, **t: ssm.vandermonde_kernel(t["W"], t["log_A_bar"], length, backend=backend),
        shapes=lambda b, l: (b, l),
        empty_length="length must be a positive int",
    ),
    "ssm.s4d_kernel": Op(
        make=lambda b, l: dict(A=-rand(b, N, dtype=C64).abs(), B=rand(b, N, dtype=C64, seed=1),
                               C=rand(b, N, dtype=C64, seed=2), step=rand(b, seed=3).abs() * 0.1),  # fmt: skip
        call=lambda backend, length, **t: ssm.s4d_kernel(t["A"], t["B"], t["C"], t["step"], length, backend=backend),
        shapes=lambda b, l: (b, l),
        empty_length="length must be a positive int",
    ),
    "s4.cauchy": Op(  # batch: the rows H; length: the evaluation points L
        make=lambda b, l: dict(v=rand(b, N, dtype=C64), z=rand(b, l, dtype=C64, seed=1) + 3j,
                               w=rand(b, N, dtype=C64, seed=2)),  # fmt: skip
        call=lambda backend, length, **t: s4.cauchy(t["v"], t["z"], t["w"], backend=backend),
        shapes=lambda b, l: (b, l),
    ),
    "s4.s4_kernel": Op(
        make=lambda b, l: dict(Lambda=-rand(b, N, dtype=C64).abs(), P=rand(b, N, dtype=C64, seed=1) * 0.1,
                               B=rand(b, N, dtype=C64, seed=2), C=rand(b, N, dtype=C64, seed=3),
                               log_step=rand(b, seed=4) - 3),  # fmt: skip
        call=lambda backend, length, **t: s4.s4_kernel(*t.values(), length, backend=backend),
        shapes=lambda b, l: (b, l),
        empty_length="L must be a positive int",
    ),
    "mamba.selective_scan": Op(
        make=lambda b, l: dict(u=rand(b, l, D), delta=rand(b, l, D, seed=1), A=-rand(D, N, seed=2).abs(),
                               B=rand(b, l, N, seed=3), C=rand(b, l, N, seed=4), D=rand(D, seed=5),
                               z=rand(b, l, D, seed=6), delta_bias=rand(D, seed=7)),  # fmt: skip
        call=lambda backend, **t: mamba.selective_scan(*t.values(), True, True, backend=backend),
        shapes=lambda b, l: ((b, l, D), (b, D, N)),
    ),
    "mamba.ssd": Op(
        make=lambda b, l: dict(x=rand(b, l, H, P), dt=rand(b, l, H, seed=1).abs(), A=-rand(H, seed=2).abs(),
                               B=rand(b, l, 1, N, seed=3), C=rand(b, l, 1, N, seed=4),
                               initial_state=rand(b, H, P, N, seed=5)),  # fmt: skip
        call=lambda backend, **t: mamba.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], None, t["initial_state"], True,
                                            backend=backend),  # fmt: skip
        shapes=lambda b, l: ((b, l, H, P), (b, H, P, N)),
        state=(("initial_state",), 1),
    ),
    "attention.attention": Op(
        make=lambda b, l: dict(q=rand(b, l, H, D), k=rand(b, l, H, D, seed=1), v=rand(b, l, H, D, seed=2)),
        call=lambda backend, **t: attention.attention(t["q"], t["k"], t["v"], causal=True, backend=backend),
        shapes=lambda b, l: (b, l, H, D),
    ),
    "attention.attention(causal=False)": Op(
        make=lambda b, l: dict(q=rand(b, l, H, D), k=rand(b, l, H, D, seed=1), v=rand(b, l, H, D, seed=2)),
        call=lambda backend, **t: attention.attention(t["q"], t["k"], t["v"], causal=False, backend=backend),
        shapes=lambda b, l: (b, l, H, D),
    ),
    "linear_attention.linear_attention": Op(
        make=lambda b, l: dict(q=rand(b, l, H, D), k=rand(b, l, H, D, seed=1), v=rand(b, l, H, D, seed=2),
                               log_decay=-rand(b, l, H, seed=3).abs(), initial_state=rand(b, H, D, D, seed=4)),
        call=lambda backend, **t: linear_attention.linear_attention(*list(t.values())[:3], log_decay=t["log_decay"],
                                                                   initial_state=t["initial_state"],
                                                                   return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, H, D), (b, H, D, D)),
        state=(("initial_state",), 1),
    ),
    "linear_attention.gla": Op(
        make=lambda b, l: dict(q=rand(b, l, H, D), k=rand(b, l, H, D, seed=1), v=rand(b, l, H, D, seed=2),
                               log_alpha=-rand(b, l, H, D, seed=3).abs(), initial_state=rand(b, H, D, D, seed=4),
                               bonus=rand(H, D, seed=5)),
        call=lambda backend, **t: linear_attention.gla(*list(t.values())[:4], initial_state=t["initial_state"],
                                                       bonus=t["bonus"], return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, H, D), (b, H, D, D)),
        state=(("initial_state",), 1),
    ),
    "linear_attention.delta_rule": Op(
        make=lambda b, l: dict(q=rand(b, l, H, D), k=torch.nn.functional.normalize(rand(b, l, H, D, seed=1), dim=-1),
                               v=rand(b, l, H, D, seed=2), beta=rand(b, l, H, seed=3).sigmoid(),
                               initial_state=rand(b, H, D, D, seed=4)),
        call=lambda backend, **t: linear_attention.delta_rule(*list(t.values())[:4], initial_state=t["initial_state"],
                                                              return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, H, D), (b, H, D, D)),
        state=(("initial_state",), 1),
    ),
    "rwkv.wkv4": Op(
        make=lambda b, l: dict(w=rand(D, seed=1).abs(), u=rand(D, seed=2), k=rand(b, l, D, seed=3),
                               v=rand(b, l, D, seed=4), state_a=rand(b, D, seed=5), state_b=rand(b, D, seed=6).abs(),
                               state_p=rand(b, D, seed=7)),
        call=lambda backend, **t: rwkv.wkv4(t["w"], t["u"], t["k"], t["v"],
                                            initial_state=(t["state_a"], t["state_b"], t["state_p"]),
                                            return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, D), ((b, D), (b, D), (b, D))),
        state=(("state_a", "state_b", "state_p"), 1),
        labels=dict(state_a="initial_state", state_b="initial_state", state_p="initial_state"),
    ),
    "rwkv.wkv6": Op(
        make=lambda b, l: dict(r=rand(b, l, H, D), k=rand(b, l, H, D, seed=1), v=rand(b, l, H, D, seed=2),
                               log_w=-rand(b, l, H, D, seed=3).abs(), u=rand(H, D, seed=4),
                               initial_state=rand(b, H, D, D, seed=5)),
        call=lambda backend, **t: rwkv.wkv6(*list(t.values())[:5], initial_state=t["initial_state"],
                                            return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, H, D), (b, H, D, D)),
        state=(("initial_state",), 1),
    ),
    "rwkv.wkv7": Op(
        make=lambda b, l: dict(r=rand(b, l, H, D), log_w=-rand(b, l, H, D, seed=1).abs(),
                               k=rand(b, l, H, D, seed=2), v=rand(b, l, H, D, seed=3),
                               kappa_hat=torch.nn.functional.normalize(rand(b, l, H, D, seed=4), dim=-1),
                               a=rand(b, l, H, D, seed=5).sigmoid(), initial_state=rand(b, H, D, D, seed=6)),
        call=lambda backend, **t: rwkv.wkv7(*list(t.values())[:6], initial_state=t["initial_state"],
                                            return_final_state=True, backend=backend),
        shapes=lambda b, l: ((b, l, H, D), (b, H, D, D)),
        state=(("initial_state",), 1),
    ),
}  # fmt: skip

LENGTH = 5  # the length (or number of taps) when the batch is the empty one
BACKENDS = ["reference", "triton"]
#: (operation, backend) for every backend each operation has
OP_BACKENDS = [(name, backend) for name, op in OPS.items() for backend in op.backends]


def run(op: Op, backend: str, tensors: dict, length: int):
    kwargs = dict(tensors, backend=backend)
    if "length" in op.call.__code__.co_varnames:
        kwargs["length"] = length
    return op.call(**kwargs)


def leaves(x) -> list:
    """The tensors of a result, nested tuples flattened in order."""
    return [x] if isinstance(x, torch.Tensor) else [t for item in x for t in leaves(item)]


def shape_leaves(shape) -> list:
    """The shapes of :func:`leaves` (a shape is a tuple of ints)."""
    return [shape] if all(isinstance(n, int) for n in shape) else [s for item in shape for s in shape_leaves(item)]


def check_shapes(op: Op, result, batch: int, length: int):
    """The result has the expected (nested) structure and shapes, on the inputs' device; its
    top-level items are returned."""
    want = op.shapes(batch, length)
    got, wanted = leaves(result), shape_leaves(want)
    assert len(got) == len(wanted), (type(result), want)
    for tensor, shape in zip(got, wanted):
        assert tuple(tensor.shape) == shape, (tuple(tensor.shape), shape)
        assert tensor.device.type == DEVICE
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("name,backend", OP_BACKENDS)
def test_empty_batch(name, backend):
    op = OPS[name]
    check_shapes(op, run(op, backend, op.make(0, LENGTH), LENGTH), 0, LENGTH)


@pytest.mark.parametrize("name,backend", OP_BACKENDS)
def test_empty_length(name, backend):
    op = OPS[name]
    tensors = op.make(2, 0)
    if op.empty_length is not None:
        with pytest.raises(ValueError, match=op.empty_length):
            run(op, backend, tensors, 0)
        return
    results = check_shapes(op, run(op, backend, tensors, 0), 2, 0)
    if op.state is not None:  # nothing happened: the final state is the initial one
        names, index = op.state
        for got, arg in zip(leaves(results[index]), names, strict=True):
            torch.testing.assert_close(got.to(tensors[arg].dtype), tensors[arg], rtol=0, atol=0)


def tensor_args(name):
    return [(name, arg) for arg, x in OPS[name].make(2, 3).items() if isinstance(x, torch.Tensor)]


ARGS = [(name, arg, backend) for name in OPS for _, arg in tensor_args(name) for backend in OPS[name].backends]


@pytest.mark.parametrize("name,arg,backend", ARGS, ids=[f"{n}-{a}-{b}" for n, a, b in ARGS])
def test_wrong_dtype(name, arg, backend):
    op = OPS[name]
    tensors = op.make(2, LENGTH)
    tensors[arg] = torch.ones(tensors[arg].shape, dtype=torch.int64, device=tensors[arg].device)
    with pytest.raises(TypeError) as error:
        run(op, backend, tensors, LENGTH)
    assert re.search(rf"\b{op.labels.get(arg, arg)}\b.* must", str(error.value)), str(error.value)


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("name,arg,backend", ARGS, ids=[f"{n}-{a}-{b}" for n, a, b in ARGS])
def test_wrong_device(name, arg, backend, other):
    op = OPS[name]
    tensors = op.make(2, LENGTH)
    tensors[arg] = tensors[arg].to(other)
    with pytest.raises(ValueError) as error:
        run(op, backend, tensors, LENGTH)
    message = str(error.value)
    assert "device" in message and re.search(rf"\b{op.labels.get(arg, arg)}\b", message), message


# --------------------------------------------------------------------------------------
# The holes found by hand (issue 11), one test each
# --------------------------------------------------------------------------------------


def ssd_inputs(b=2, l=LENGTH):
    t = OPS["mamba.ssd"].make(b, l)
    return [t[n] for n in ("x", "dt", "A", "B", "C")], t["initial_state"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [0, -1, True, False, 2.0, "64"])
def test_ssd_refuses_a_chunk_size_that_is_not_a_positive_int(chunk_size, backend):
    # 0 used to mean "the default" (chunk_size or 64), and True was taken as the int 1.
    args, _ = ssd_inputs()
    with pytest.raises(ValueError, match=r"ssd: chunk_size must be a positive int or None, got"):
        mamba.ssd(*args, chunk_size, backend=backend)
    with pytest.raises(ValueError, match=r"ssd_chunked: chunk_size must be a positive int, got"):
        mamba.ssd_chunked(*args, chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssd_validates_initial_state(backend):
    args, S0 = ssd_inputs()
    with pytest.raises(TypeError, match=r"ssd: initial_state must be a torch.Tensor, got list"):
        mamba.ssd(*args, None, S0.tolist(), backend=backend)
    with pytest.raises(TypeError, match=r"ssd: initial_state must be a tensor of dtype .*got torch.int64"):
        mamba.ssd(*args, None, S0.long(), backend=backend)
    with pytest.raises(ValueError, match=r"ssd: initial_state must be \(batch, heads, P, N\) = \(2, 2, 16, 4\), "
                                         r"got shape \(2, 2, 4, 16\)"):  # fmt: skip
        mamba.ssd(*args, None, S0.transpose(-1, -2), backend=backend)
    for other in OTHER_DEVICES:
        with pytest.raises(ValueError, match=rf"ssd: initial_state must be on the device of x \({args[0].device}\), "
                                             rf"got {other}"):  # fmt: skip
            mamba.ssd(*args, None, S0.to(other), backend=backend)
    with pytest.raises(TypeError, match=r"ssd_chunked: initial_state must be a torch.Tensor, got list"):
        mamba.ssd_chunked(*args, 16, S0.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences_pass_gradients_through(backend):
    # ssd at length 0: y is empty and the final state is the initial one, so the gradient
    # of the final state flows to the initial state unchanged; attention at length 0: an
    # empty output that backward() accepts.
    args, S0 = ssd_inputs(2, 0)
    S0 = S0.clone().requires_grad_()
    y, final = mamba.ssd(*args, None, S0, True, backend="reference")  # length 0 is the readable form's case
    assert y.shape == (2, 0, H, P)
    (final * 3).sum().backward()
    torch.testing.assert_close(S0.grad, torch.full_like(S0, 3.0), rtol=0, atol=0)
    q, k, v = (x.requires_grad_() for x in OPS["attention.attention"].make(2, 0).values())
    o = attention.attention(q, k, v, causal=True, backend=backend)
    o.sum().backward()
    assert o.shape == (2, 0, H, D) and v.grad.shape == v.shape


def test_every_public_op_is_here():
    # A new public function with a backend argument must join OPS (seqbook.backend.resolve
    # is the dispatcher itself, not an operation; the experiment runners of seqbook.experiments*
    # only pass a backend on to the mixers they build).
    import importlib
    import inspect
    import pkgutil

    import seqbook

    found = set()
    for info in pkgutil.iter_modules(seqbook.__path__):
        if info.name.startswith("experiments"):
            continue
        module = importlib.import_module(f"seqbook.{info.name}")
        for fname, fn in vars(module).items():
            if (inspect.isfunction(fn) and fn.__module__ == module.__name__ and not fname.startswith("_")
                    and "backend" in inspect.signature(fn).parameters and fname != "resolve"):  # fmt: skip
                found.add(f"{info.name}.{fname}")
    covered = {name.split("(")[0] for name in OPS}
    assert {"attention.attention", "mamba.ssd", "rwkv.wkv7"} <= found  # the search does find them
    assert found <= covered, f"public ops missing from OPS: {sorted(found - covered)}"


def test_a_bool_is_not_a_step():
    # True is the int 1 to Python: s4d_kernel(..., step=True, ...) used to run with a step of 1.
    t = OPS["ssm.s4d_kernel"].make(2, LENGTH)
    with pytest.raises(TypeError, match=r"step must be a positive number or a tensor, got True"):
        ssm.s4d_kernel(t["A"], t["B"], t["C"], True, LENGTH)


@pytest.mark.parametrize("flag", [1, "False", None])
def test_ssd_flags_are_bools(flag):
    # return_final_state="False" is true to Python: it would have returned the pair.
    args, _ = ssd_inputs()
    with pytest.raises(TypeError, match=r"ssd: return_final_state must be a bool, got"):
        mamba.ssd(*args, return_final_state=flag)
    with pytest.raises(TypeError, match=r"ssd_chunked: return_final_state must be a bool, got"):
        mamba.ssd_chunked(*args, return_final_state=flag)


def test_ops_without_a_kernel_say_so():
    # When one of these gets a kernel, this fails: add "triton" to its backends above, so
    # that the kernel meets the empty, wrong-dtype and wrong-device inputs too. (Every
    # operation has a kernel since RWKV-7's; a loop, not a parametrization, so that an empty
    # list is not reported as a skipped test.)
    for name, op in OPS.items():
        if "triton" not in op.backends:
            with pytest.raises(NotImplementedError, match="no Triton kernel"):
                run(op, "triton", op.make(2, LENGTH), LENGTH)


@pytest.mark.parametrize("values, lo, hi, seen", [
    ([0.5, 2.5], 0, 2, r"must lie in \[0, 2\] \(why\), got values in \[0\.5, 2\.5\]"),
    ([-1.0, 0.1], None, 0, r"must be <= 0 \(why\), got a maximum of 0\.1"),
    ([-1.0, 0.5], 0, None, r"must be >= 0 \(why\), got a minimum of -1"),
    ([-1.0, float("nan")], None, 0, r"must be <= 0 \(why\), got a maximum of nan"),
])  # fmt: skip
def test_a_value_out_of_range_is_named_with_what_was_seen(values, lo, hi, seen):
    from seqbook.validate import check_range

    with pytest.raises(ValueError, match=r"^f: x " + seen):
        check_range("f", "x", torch.tensor(values), lo, hi, "why")
    check_range("f", "x", torch.tensor([]), lo, hi, "why")  # empty: nothing to check
    inside = torch.tensor([lo if lo is not None else hi, hi if hi is not None else lo], dtype=torch.float32)
    check_range("f", "x", inside, lo, hi, "why")  # the bounds themselves are allowed
