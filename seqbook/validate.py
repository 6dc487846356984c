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
