"""Data-parallel training: two processes under ``torchrun`` (gloo, CPU) take the same steps as one.

The workers see no GPU (``CUDA_VISIBLE_DEVICES=""``), so the test is the same gloo run on a CUDA machine.

:func:`seqbook.train.fit` under ``torchrun --nproc_per_node=2`` gives each process half of the same
global batch and lets DistributedDataParallel average the gradients. On a task whose loss is a mean
over the same number of terms in every half (MQAR: every sequence of a batch has the same number of
queries), that is one process's step on the whole batch, up to the order of the float32 sums: the
losses and the trained parameters must agree to float32 rounding, grown a little by a few AdamW steps.

This file is also the worker: ``python -m torch.distributed.run ... tests/test_distributed.py OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from seqbook import train
from seqbook.experiments_h2h import build, mqar_batch

STEPS, BATCH, PAIRS, KEYS = 4, 8, 4, 8


def run_training() -> tuple[list[float], torch.Tensor, list[int]]:
    """A small Mamba LM trained on MQAR; the loss history, every parameter (flattened), and the batch
    size of every forward pass the model made."""
    model = build("Mamba", 16, 2 * KEYS, seed=0)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    history = train.fit(model, lambda g: mqar_batch(BATCH, PAIRS, g, n_keys=KEYS, n_values=KEYS), STEPS,
                        lr=3e-3, seed=0, weight_decay=0.1, warmup=1)  # fmt: skip
    return history["loss"], torch.cat([p.detach().flatten() for p in model.parameters()]), seen


def test_two_processes_take_the_steps_of_one(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    got = torch.load(out)
    assert got["world"] == 2
    losses, params, seen = run_training()
    assert seen == [BATCH] * STEPS and got["seen"] == [BATCH // 2] * STEPS  # each process ran half the batch
    assert len(got["losses"]) == STEPS
    # the same steps: losses to float32 rounding, parameters to a few AdamW steps of it
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    assert (params - got["params"]).abs().max() <= 1e-4 * max(params.abs().max().item(), 1.0)
    # a global batch that does not split evenly is refused (the step would not be one process's)
    assert got["uneven"] == "fit: the global batch (7) must be divisible by the number of processes (2)"
    init = torch.cat([p.detach().flatten() for p in build("Mamba", 16, 2 * KEYS, seed=0).parameters()])
    assert (params - init).abs().max() > 1e-3  # it trained: the comparison is not of two untouched models


if __name__ == "__main__":  # one torchrun worker
    rank, world = train.init_distributed()
    torch.set_num_threads(1)
    losses, params, seen = run_training()
    _, shard, _ = train._data_parallel(torch.nn.Linear(1, 1))
    try:
        shard(torch.zeros(7, 3), torch.zeros(7))
        uneven = "accepted"
    except ValueError as error:
        uneven = str(error)
    if rank == 0:
        torch.save({"world": world, "losses": losses, "params": params, "seen": seen, "uneven": uneven}, sys.argv[1])
    torch.distributed.destroy_process_group()
