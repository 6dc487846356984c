r"""A small training loop, deterministic given a seed, that chapter notebooks share.

:func:`fit` draws a fresh batch from ``data_fn(generator)`` at every step, takes one AdamW
step, and records the loss (and the accuracy, for classification) of that batch;
:func:`evaluate` scores a model on a fixed batch. Two things follow S4 and S4D's training
recipe: parameters tagged ``_ssm`` (the SSM's ``A``, ``B``, step; see :mod:`seqbook.nn`)
get a smaller learning rate and no weight decay, and the learning rate follows a cosine
schedule with a short warm-up.

Determinism: ``torch.manual_seed(seed)`` before the first step (dropout) and a data
generator seeded with ``seed``; on CPU the same call returns the same history. The
model's initialization is the caller's: seed before building it.

Several processes (data parallel). Under ``torchrun --nproc_per_node=N`` (which sets up
``torch.distributed``: see :func:`init_distributed`), :func:`fit` wraps the model in PyTorch's
``DistributedDataParallel``: every process draws the same global batch from the same seeded
generator, keeps its ``1/N`` slice, and DDP averages the gradients, so each step is the step of
one process on the whole batch (up to the order of the float sums) whenever the loss is a mean
over the same number of terms in every slice. The recorded loss is averaged over the processes.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import os

import torch
import torch.distributed as dist
from torch.nn import functional as F

LOSSES = ("auto", "mse", "cross_entropy")


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor):
    """The loss, and the accuracy (None for regression)."""
    if kind == "auto":
        kind = "mse" if y.is_floating_point() else "cross_entropy"
    if kind == "cross_entropy":
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        acc = (out.argmax(-1) == y).float().mean().item()
        return loss, acc
    if out.shape[-1] == 1 and y.ndim == out.ndim - 1:  # (batch, 1) prediction for a (batch,) target
        out = out[..., 0]
    return F.mse_loss(out, y), None


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (gloo on the CPU, NCCL on CUDA), once.

    Returns ``(rank, world_size)``; ``(0, 1)`` when not started by ``torchrun`` (no ``WORLD_SIZE``).
    On CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise RuntimeError(f"init_distributed: LOCAL_RANK is {local} but only {count} CUDA device(s) are visible: "
                               f"start at most {count} processes per node, or hide the GPUs "
                               f"(CUDA_VISIBLE_DEVICES='') to train on the CPU with gloo")  # fmt: skip
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _data_parallel(model: torch.nn.Module):
    """``(net, shard, average)`` for the process group fit trains in: ``net`` the model (wrapped in
    DistributedDataParallel when there are several processes), ``shard(x, y)`` this process's slice
    of a global batch, ``average(loss, accuracy)`` the global batch's values. One process: the model
    and two identities."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model, lambda x, y: (x, y), lambda loss, acc: (loss, acc)
    rank, world = dist.get_rank(), dist.get_world_size()

    def shard(x, y):  # equal slices keep the step exact: the batch must split evenly
        if x.shape[0] % world:
            raise ValueError(f"fit: the global batch ({x.shape[0]}) must be divisible by the number of processes "
                             f"({world})")  # fmt: skip
        return x.tensor_split(world)[rank], y.tensor_split(world)[rank]

    def average(loss, acc):
        stats = torch.tensor([loss, 0.0 if acc is None else acc], dtype=torch.float64,
                             device="cuda" if dist.get_backend() == "nccl" else "cpu")  # fmt: skip
        dist.all_reduce(stats)
        stats = (stats / world).tolist()
        return stats[0], None if acc is None else stats[1]

    return torch.nn.parallel.DistributedDataParallel(model), shard, average


def fit(
    model: torch.nn.Module,
    data_fn: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    *,
    seed: int = 0,
    loss: str = "auto",
    weight_decay: float = 0.0,
    ssm_lr: float | None = None,
    warmup: int = 0,
    clip: float | None = 1.0,
    progress: bool = False,
    log_every: int = 50,
) -> dict:
    r"""Train ``model`` for ``steps`` AdamW steps; returns the history.

    Args:
        model: maps ``x`` to predictions: ``(batch, classes)`` logits or ``(batch, 1)`` / ``(batch,)`` values.
        data_fn: ``data_fn(generator) -> (x, y)``, a fresh batch each call, e.g.
            ``lambda g: tasks.adding_problem(32, 200, generator=g)``.
        steps: optimizer steps.
        lr: peak learning rate (cosine decay to 0 after ``warmup`` linear steps).
        seed: seeds the data generator and torch's global RNG (dropout).
        loss: ``"mse"``, ``"cross_entropy"``, or ``"auto"`` (cross-entropy for integer targets).
        weight_decay: AdamW's, for all parameters not tagged ``_ssm``.
        ssm_lr: the learning rate of parameters tagged ``_ssm`` (default ``min(lr, 1e-3)``,
            S4D's choice); they get no weight decay.
        clip: gradient-norm clipping (None: off).
        progress: print a line every ``log_every`` steps.

    Returns:
        ``{"step": [...], "loss": [...], "accuracy": [...], "seconds": float}``, one entry per
        step (training-batch loss; ``accuracy`` only for classification).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ssm = [p for p in model.parameters() if p.requires_grad and getattr(p, "_ssm", False)]
    rest = [p for p in model.parameters() if p.requires_grad and not getattr(p, "_ssm", False)]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if ssm:
        groups.append({"params": ssm, "lr": min(lr, 1e-3) if ssm_lr is None else ssm_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    peak = [g["lr"] for g in opt.param_groups]

    def schedule(step):  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    net, shard, average = _data_parallel(model)  # one process: the model itself (module docstring)
    history = {"step": [], "loss": [], "accuracy": []}
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for g, p in zip(opt.param_groups, peak):
            g["lr"] = p * schedule(step)
        x, y = shard(*data_fn(gen))
        value, acc = _loss(loss, net(x), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        value, acc = average(value.item(), acc)
        history["step"].append(step)
        history["loss"].append(value)
        if acc is not None:
            history["accuracy"].append(acc)
        if progress and (step % log_every == 0 or step == steps - 1):
            extra = f"  accuracy {acc:.3f}" if acc is not None else ""
            print(f"step {step:5d}  loss {value:.4f}{extra}  ({time.perf_counter() - start:.1f} s)")
    history["seconds"] = time.perf_counter() - start
    if not history["accuracy"]:
        del history["accuracy"]
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = "auto") -> dict:
    """Loss (and accuracy, for classification) of ``model`` on one fixed batch, in eval mode (no dropout)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    was_training = model.training
    model.eval()
    value, acc = _loss(loss, model(x), y)
    model.train(was_training)
    out = {"loss": value.item()}
    if acc is not None:
        out["accuracy"] = acc
    return out
