"""Argument checks shared by the public entries.

Every public operation validates its arguments before it computes anything, and a bad one
raises ``TypeError`` (not a tensor, wrong dtype) or ``ValueError`` (wrong shape, device or
value) with a message that starts with the function, names the argument and says what was
expected, e.g. ``ssd: initial_state must be on the device of x (cuda:0), got cpu``. The
checks come first so that a mistake never surfaces as a shape error deep inside an einsum,
or as a device error from inside a kernel launch.

Most modules keep their own shape checks (a shape is best described in the symbols of the
module's glossary); the pieces that are the same everywhere live here.
"""

from __future__ import annotations

import torch


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, x, dtypes: tuple[torch.dtype, ...], *, optional: bool = False) -> None:
    """``x`` is a tensor of one of ``dtypes`` (or None, if ``optional``)."""
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must be a tensor of dtype {_names(dtypes)}; got {x.dtype}")


def check_device(fn: str, name: str, x, like_name: str, like: torch.Tensor) -> None:
    """``x`` (a tensor, or None) is on the device of ``like``."""
    if x is not None and x.device != like.device:
        raise ValueError(f"{fn}: {name} must be on the device of {like_name} ({like.device}), got {x.device}")


def check_shape(fn: str, name: str, x, shape: tuple[int, ...], symbols: str) -> None:
    """``x`` (a tensor, or None) has ``shape``; ``symbols`` spells it out, e.g. ``"(batch, heads, P, N)"``."""
    if x is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must be {symbols} = {tuple(shape)}, got shape {tuple(x.shape)}")


def check_positive_int(fn: str, name: str, value, *, optional: bool = False) -> None:
    """``value`` is an int >= 1 (None allowed if ``optional``). ``True`` is refused: in Python
    it is the int 1, but a flag passed where a size belongs is a mistake, not a size."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{fn}: {name} must be {allowed}, got {value!r}")


def check_bool(fn: str, name: str, value) -> None:
    """``value`` is a bool: a flag given as 0, 1 or a string is a mistake (``"False"`` is true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def check_range(fn: str, name: str, x: torch.Tensor, lo: float | None, hi: float | None, meaning: str) -> None:
    """Every entry of ``x`` lies in ``[lo, hi]`` (a bound of None is open); NaN fails.

    A value check reads the tensor on the host: on a GPU that is one synchronisation per call.
    Inside a CUDA graph capture or a ``torch.compile`` trace a host read is impossible (the
    capture would fail), so there the check is skipped and the caller vouches for the values;
    everywhere else a decay outside (0, 1] or a step outside its range raises here, not as a
    silent overflow inside a kernel. ``meaning`` says why the range, e.g.
    ``"a decay gamma = exp(log_decay) in (0, 1]"``.
    """
    if not x.numel() or torch.compiler.is_compiling():
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    ok = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        ok &= x >= lo
    if hi is not None:
        ok &= x <= hi
    if bool(ok.all()):
        return
    if lo is None:
        rule, seen = f"<= {hi:g}", f"a maximum of {x.max().item():.3g}"
    elif hi is None:
        rule, seen = f">= {lo:g}", f"a minimum of {x.min().item():.3g}"
    else:
        rule, seen = f"lie in [{lo:g}, {hi:g}]", f"values in [{x.min().item():.3g}, {x.max().item():.3g}]"
    raise ValueError(f"{fn}: {name} must {'be ' if lo is None or hi is None else ''}{rule} ({meaning}), got {seen}")
