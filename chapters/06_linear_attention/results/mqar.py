"""Chapter 6's recall experiment: softmax attention against linear attention on MQAR, both trained.

Two-layer language models (``seqbook.nn.LanguageModel``) that differ only in the mixer,
``MultiHeadAttention`` or ``LinearAttention``, trained on multi-query associative recall
(``seqbook.tasks.associative_recall``; Arora et al. 2023, "Zoology") for each number of stored
pairs and each seed, then scored on a fixed test set. Writes ``mqar.json`` beside this file
(or ``--out``): the command, the commit, the device, the seeds, the wall time and every number.

    python chapters/06_linear_attention/results/mqar.py --seeds 0 1 2          # CPU: slow
    python chapters/06_linear_attention/results/mqar.py --device cuda --jobs 6   # a GPU: minutes

The notebook plots the file and re-runs one small case live.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from seqbook import attention, linear_attention, tasks, train  # noqa: E402
from seqbook.experiments import git_commit  # noqa: E402
from seqbook.nn import LanguageModel  # noqa: E402

MIXERS = {
    "softmax attention": lambda d, h: attention.MultiHeadAttention(d, h),
    "linear attention": lambda d, h: linear_attention.LinearAttention(d, h),
}


class AtQueries(torch.nn.Module):
    """The language model's logits at the last ``n_queries`` positions, where the answers are asked for."""

    def __init__(self, lm: torch.nn.Module, n_queries: int):
        super().__init__()
        self.lm, self.n_queries = lm, n_queries

    def forward(self, tokens):
        return self.lm(tokens)[:, -self.n_queries:]


def run_one(mixer: str, n_pairs: int, seed: int, *, d_model: int, n_heads: int, steps: int, batch: int, lr: float,
            n_keys: int, n_values: int, device: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    lm = LanguageModel(lambda d: MIXERS[mixer](d, n_heads), vocab_size=n_keys + n_values, d_model=d_model,
                       n_layers=2, ffn_mult=2).to(device)
    model = AtQueries(lm, n_pairs)

    def data(g):
        x, y = tasks.associative_recall(batch, n_pairs, n_keys=n_keys, n_values=n_values, generator=g)
        return x.to(device), y.to(device)

    history = train.fit(model, data, steps, lr=lr, warmup=steps // 20, seed=seed, weight_decay=0.1)
    test_x, test_y = tasks.associative_recall(1000, n_pairs, n_keys=n_keys, n_values=n_values,
                                              generator=torch.Generator().manual_seed(10_000 + seed))
    score = train.evaluate(model, test_x.to(device), test_y.to(device))
    every = max(1, steps // 50)
    return {"mixer": mixer, "n_pairs": n_pairs, "seed": seed, "test_accuracy": score["accuracy"],
            "test_loss": score["loss"], "seconds": history["seconds"],
            "train_accuracy": [sum(history["accuracy"][i:i + every]) / len(history["accuracy"][i:i + every])
                               for i in range(0, steps, every)],
            "state_numbers_per_layer": (n_heads * (d_model // n_heads) ** 2 if mixer == "linear attention"
                                        else 2 * d_model * (3 * n_pairs))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-keys", type=int, default=64)
    p.add_argument("--n-values", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("mqar.json"))
    args = p.parse_args(argv)
    settings = dict(d_model=args.d_model, n_heads=args.heads, steps=args.steps, batch=args.batch, lr=args.lr,
                    n_keys=args.n_keys, n_values=args.n_values, device=args.device)
    cases = [(m, n, s) for n in args.pairs for s in args.seeds for m in MIXERS]
    start, at_start = time.perf_counter(), git_commit("seqbook", __file__)  # the code that runs is the code at the start
    if args.jobs > 1:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            runs = list(pool.map(_run_case, [(c, settings) for c in cases]))
    else:
        runs = [_run_case((c, settings)) for c in cases]
    for r in runs:
        print(f"{r['mixer']:>17}, {r['n_pairs']:3d} pairs, seed {r['seed']}: test accuracy {r['test_accuracy']:.3f} "
              f"({r['seconds']:.0f} s)", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"command": " ".join(["python", "chapters/06_linear_attention/results/mqar.py"] + (argv or sys.argv[1:])),
              "commit": at_start, "device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "seeds": args.seeds, "settings": settings, "wall_seconds": time.perf_counter() - start, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")


def _run_case(case):
    (mixer, n_pairs, seed), settings = case
    return run_one(mixer, n_pairs, seed, **settings)


if __name__ == "__main__":
    main()
