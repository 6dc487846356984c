r"""Experiments too long for a notebook: run once from the command line, recorded as JSON, plotted by the book.

A chapter's notebook must execute in a few minutes on a laptop CPU; an honest experiment (several
seeds, full training runs) often cannot. So each such experiment is a function here, run as

    python -m seqbook.experiments NAME [--seeds 3] [--steps 1000] [--out FILE]

which writes a JSON record (the command, the git commit, the seeds, the wall time, the package
versions and every number measured) into the chapter's ``results/`` folder. The notebook plots the
committed record and re-runs a small live version of the same function (one seed, fewer steps)
whose result must agree with it in direction. ``python -m seqbook.experiments --list`` lists them.

Experiments:

- :func:`hippo_init_ablation` (chapter 3): S4 and S4D on delayed recall at length 1024, as
  initialized and with the imaginary parts of their eigenvalues zeroed: what HiPPO's frequencies buy.
- :func:`selective_copying_ablation` (chapter 4): Mamba's Table 1 on a laptop scale: the same
  Mamba block around a time-invariant SSM (S4-style, LTI) or the selective one (S6), each with and
  without the short convolution, on selective copying; several seeds.
- Chapters 5-7 (:mod:`seqbook.experiments_chapters`): ``attention_scale_ablation``,
  ``linear_attention_mqar``, ``lm_comparison``; chapter 6 (:mod:`seqbook.experiments_delta`):
  ``delta_recall``, ``delta_recall_rewrites``.
- Chapter 8: ``mqar_head_to_head``, ``mqar_state_sweep`` (:mod:`seqbook.experiments_h2h`);
  ``copying_head_to_head``, ``selective_copying_head_to_head``, ``induction_heads_head_to_head``
  (:mod:`seqbook.experiments_copying`); ``lm_matched_compute``, ``images_as_sequences``,
  ``image_orders`` (:mod:`seqbook.experiments_beyond`). Their controls are the same entries with
  ``--families`` (``"GLA + conv"``, ``"DeltaNet, no conv"``, ``"Based + conv"``, ...: the
  variants of :data:`seqbook.experiments_h2h.CONV_VARIANTS`) and ``--out``; each record holds the
  command that made it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import tasks, train
from .nn import S4, S4D, SequenceModel
from .mamba import Mamba

ROOT = Path(__file__).resolve().parent.parent

#: name -> (function, default output path relative to the repository root)
EXPERIMENTS: dict[str, tuple[Callable, str]] = {}


def experiment(name: str, default_out: str):
    """Register ``fn`` as experiment ``name``; its record goes to ``default_out`` unless ``--out`` says otherwise."""

    def register(fn):
        EXPERIMENTS[name] = (fn, default_out)
        return fn

    return register


def git_commit(*paths: str | Path) -> str:
    """The checkout's commit, with ``+uncommitted`` when tracked files under ``paths`` (default: the whole
    checkout) differ from it ("unknown" outside git). Pass the code that runs (``"seqbook"``, the script):
    edits elsewhere in the checkout do not change what was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *map(str, paths)],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return commit + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------
# Chapter 4: selective copying, LTI against S6, with and without the convolution
# --------------------------------------------------------------------------------------


class ReadAnswers(nn.Module):
    """A sequence-to-sequence model read at its last ``n`` steps (the marker steps of selective copying)."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, -self.n :]


#: The ablation's models: the mixer inside the same one-layer SequenceModel of width 32.
#: Every "Mamba" variant is seqbook.mamba.Mamba(32, d_state=8) with only ``selective`` and ``d_conv`` changed.
ABLATION_MIXERS: dict[str, Callable[[int], nn.Module]] = {
    "LTI + conv": lambda d: Mamba(d, d_state=8, d_conv=4, selective=False),
    "S6 + conv": lambda d: Mamba(d, d_state=8, d_conv=4, selective=True),
    "LTI, no conv": lambda d: Mamba(d, d_state=8, d_conv=1, selective=False),
    "S6, no conv": lambda d: Mamba(d, d_state=8, d_conv=1, selective=True),
    "S4D layer": lambda d: S4D(d, 64),  # chapter 3's layer alone, for reference
}


def copying_model(mixer_factory: Callable[[int], nn.Module], seed: int, *, n_tokens: int = 4, n_colors: int = 4,
                  d_model: int = 32) -> nn.Module:  # fmt: skip
    """One residual block of ``mixer_factory(d_model)`` between a linear encoder and decoder, read at the
    ``n_tokens`` marker steps; initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = SequenceModel(mixer_factory, d_input=n_colors + 2, d_model=d_model, n_layers=1, d_output=n_colors,
                          pool=None)  # fmt: skip
    return ReadAnswers(model, n_tokens)


@experiment("selective_copying_ablation", "chapters/04_mamba/results/selective_copying_ablation.json")
def selective_copying_ablation(
    seeds=(0, 1, 2),
    steps: int = 1000,
    *,
    models=tuple(ABLATION_MIXERS),
    length: int = 64,
    n_tokens: int = 4,
    n_colors: int = 4,
    batch: int = 32,
    lr: float = 1e-2,
    n_test: int = 1000,
    curve_every: int = 10,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Selective copying with the same block around an LTI or a selective SSM, with and without the convolution.

    For every model in ``models`` (keys of :data:`ABLATION_MIXERS`) and every seed: build the model
    from ``torch.manual_seed(seed)``, train it ``steps`` AdamW steps on fresh batches drawn with
    ``seed`` (:func:`seqbook.train.fit`, cosine schedule, 50 warm-up steps, the same learning rate for
    every parameter), and score it on one fixed test set of ``n_test`` sequences (seed 1234).

    Returns the record: ``{"config": {...}, "runs": [{"model", "seed", "test_accuracy", "test_loss",
    "parameters", "seconds", "curve": training-batch accuracy averaged over blocks of
    curve_every steps}, ...], "summary": {model: {"mean", "std", "min", "max", "n"}}}``.
    ``on_run(record)`` is called after every run with the record so far (the command line saves it,
    so that a long run interrupted keeps what it measured).
    """
    seeds = [int(s) for s in seeds]
    unknown = [m for m in models if m not in ABLATION_MIXERS]
    if unknown:
        raise ValueError(f"models must be among {list(ABLATION_MIXERS)}, got {unknown}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    x_test, y_test = tasks.selective_copying(n_test, length, n_tokens, n_colors,
                                             generator=torch.Generator().manual_seed(1234))  # fmt: skip

    def data(g):
        return tasks.selective_copying(batch, length, n_tokens, n_colors, generator=g)

    config = dict(seeds=seeds, steps=steps, models=list(models), length=length, n_tokens=n_tokens,
                  n_colors=n_colors, batch=batch, lr=lr, n_test=n_test, test_seed=1234, d_model=32, d_state=8,
                  curve_every=curve_every, chance=1 / n_colors)  # fmt: skip
    return _train_and_score(
        config, lambda name, seed: copying_model(ABLATION_MIXERS[name], seed, n_tokens=n_tokens, n_colors=n_colors),
        data, x_test, y_test, progress=progress, on_run=on_run, warmup=min(50, steps // 10),
        log_every=max(1, steps // 5))  # fmt: skip


def _train_and_score(config: dict, build: Callable[[str, int], nn.Module], data, x_test, y_test, *,
                     progress: bool, on_run: Callable[[dict], None] | None, **fit_kwargs) -> dict:  # fmt: skip
    """Train ``build(name, seed)`` for every model and seed of ``config`` with :func:`seqbook.train.fit`
    (``config["steps"]`` steps at ``config["lr"]`` for every parameter, batches from ``data`` drawn with
    ``seed``), score it on ``(x_test, y_test)``, and return the record the ablations share;
    ``on_run`` gets the record so far after every run."""
    runs, every = [], config["curve_every"]
    for name in config["models"]:
        for seed in config["seeds"]:
            model = build(name, seed)
            if progress:
                print(f"{name}, seed {seed}", flush=True)
            history = train.fit(model, data, config["steps"], lr=config["lr"], ssm_lr=config["lr"], seed=seed,
                                progress=progress, **fit_kwargs)  # fmt: skip
            test = train.evaluate(model, x_test, y_test)
            acc = torch.tensor(history["accuracy"])
            blocks = acc[: len(acc) // every * every].reshape(-1, every).mean(1)
            runs.append({"model": name, "seed": seed, "test_accuracy": round(test["accuracy"], 4),
                         "test_loss": round(test["loss"], 4),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "seconds": round(history["seconds"], 1),
                         "curve": [round(v, 4) for v in blocks.tolist()]})  # fmt: skip
            if on_run is not None:
                on_run({"config": config, "runs": runs, "summary": _summary(runs)})
    return {"config": config, "runs": runs, "summary": _summary(runs)}


def _summary(runs: list[dict]) -> dict:
    """Mean, standard deviation (over seeds), min, max and count of the test accuracy, per model."""
    summary = {}
    models = list(dict.fromkeys(r["model"] for r in runs))
    for name in models:
        accs = torch.tensor([r["test_accuracy"] for r in runs if r["model"] == name], dtype=torch.float64)
        summary[name] = {"mean": round(accs.mean().item(), 4),
                         "std": round(accs.std().item(), 4) if len(accs) > 1 else 0.0,
                         "min": round(accs.min().item(), 4), "max": round(accs.max().item(), 4), "n": len(accs)}  # fmt: skip
    return summary


# --------------------------------------------------------------------------------------
# Chapter 3: what the HiPPO initialization buys, for S4 and S4D
# --------------------------------------------------------------------------------------


def _zero_imaginary(model: nn.Module) -> nn.Module:
    """Set the imaginary parts of the state matrix's eigenvalues to 0 (S4's Lambda, S4D's A) at initialization."""
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        (mixer.Lambda_imag if hasattr(mixer, "Lambda_imag") else mixer.A_imag).zero_()
    return model


#: The delayed-recall models: chapter 3's SequenceModel of width 32, one block, read at the last step.
#: (name -> (mixer factory, zero the imaginary parts at initialization?))
HIPPO_MIXERS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "S4 (LegS)": (lambda d: S4(d, 32, step_min=1e-4, step_max=1e-2), False),
    "S4, Im Lambda = 0": (lambda d: S4(d, 32, step_min=1e-4, step_max=1e-2), True),
    "S4D-Lin": (lambda d: S4D(d, 32, init="lin", step_min=1e-4, step_max=1e-2), False),
    "S4D-Lin, Im A = 0": (lambda d: S4D(d, 32, init="lin", step_min=1e-4, step_max=1e-2), True),
}


def delayed_recall_model(name: str, seed: int) -> nn.Module:
    """The chapter-3 model for ``name`` in :data:`HIPPO_MIXERS`, initialized from ``torch.manual_seed(seed)``."""
    factory, zero = HIPPO_MIXERS[name]
    torch.manual_seed(seed)
    model = SequenceModel(factory, d_input=1, d_model=32, n_layers=1, d_output=4, pool="last")
    return _zero_imaginary(model) if zero else model


@experiment("hippo_init_ablation", "chapters/03_hippo_s4/results/hippo_init_ablation.json")
def hippo_init_ablation(
    seeds=(0, 1),
    steps: int = 200,
    *,
    models=tuple(HIPPO_MIXERS),
    length: int = 1024,
    batch: int = 32,
    lr: float = 1e-2,
    n_test: int = 1000,
    curve_every: int = 10,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Delayed recall at ``length`` steps with S4 and S4D, each as initialized and with the imaginary parts of
    its eigenvalues set to zero (the frequencies HiPPO gives, removed; the decays kept).

    The recipe of chapter 3's S4D run (AdamW at ``lr`` for every parameter, cosine schedule, fresh
    batches drawn with ``seed``), scored on 1000 held-out sequences (seed 1234). Returns the record
    as :func:`selective_copying_ablation` does.
    """
    seeds = [int(s) for s in seeds]
    unknown = [m for m in models if m not in HIPPO_MIXERS]
    if unknown:
        raise ValueError(f"models must be among {list(HIPPO_MIXERS)}, got {unknown}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    x_test, y_test = tasks.delayed_recall(n_test, length, generator=torch.Generator().manual_seed(1234))
    config = dict(seeds=seeds, steps=steps, models=list(models), length=length, batch=batch, lr=lr, n_test=n_test,
                  test_seed=1234, d_model=32, d_state=32, curve_every=curve_every, chance=0.25)  # fmt: skip
    return _train_and_score(config, delayed_recall_model, lambda g: tasks.delayed_recall(batch, length, generator=g),
                            x_test, y_test, progress=progress, on_run=on_run, log_every=max(1, steps // 4))  # fmt: skip


# Chapter 8: every family head to head (the code lives in seqbook.experiments_h2h)
from .experiments_h2h import mqar_head_to_head  # noqa: E402

experiment("mqar_head_to_head", "chapters/08_head_to_head/results/mqar_head_to_head.json")(mqar_head_to_head)
from .experiments_h2h import REGISTRY as _H2H_EXPERIMENTS  # noqa: E402  (mqar_gpu_scale)

EXPERIMENTS.update(_H2H_EXPERIMENTS)

# Chapter 6: the delta rule against additive updates on trained recall (seqbook.experiments_delta)
from .experiments_delta import delta_recall, delta_recall_rewrites  # noqa: E402

experiment("delta_recall", "chapters/06_linear_attention/results/delta_recall.json")(delta_recall)
experiment("delta_recall_rewrites", "chapters/06_linear_attention/results/delta_recall_rewrites.json")(delta_recall_rewrites)

from .experiments_h2h import mqar_state_sweep  # noqa: E402

experiment("mqar_state_sweep", "chapters/08_head_to_head/results/mqar_state_sweep.json")(mqar_state_sweep)
from .experiments_beyond import images_as_sequences, lm_matched_compute  # noqa: E402
from . import experiments_beyond as _beyond  # noqa: E402

experiment("lm_matched_compute", "chapters/08_head_to_head/results/lm_matched_compute.json")(lm_matched_compute)
experiment("images_as_sequences", "chapters/08_head_to_head/results/images_as_sequences.json")(images_as_sequences)
experiment("image_orders", "chapters/08_head_to_head/results/image_orders.json")(_beyond.image_orders)

# Chapters 5-7: the score-scale ablation, MQAR of two mixers, the LM comparison (seqbook.experiments_chapters)
from .experiments_chapters import REGISTRY as _CHAPTER_EXPERIMENTS  # noqa: E402

EXPERIMENTS.update(_CHAPTER_EXPERIMENTS)
# Chapter 8, copying page: copying, selective copying, induction heads (seqbook.experiments_copying)
from . import experiments_copying as _copying  # noqa: E402

for _name in ("copying_head_to_head", "selective_copying_head_to_head", "induction_heads_head_to_head"):
    experiment(_name, f"chapters/08_head_to_head/results/{_name}.json")(getattr(_copying, _name))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqbook.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help="the experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON record (default: the chapter's results/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible sums)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda, for the experiments that take a device (default: the experiment's, the CPU)")
    parser.add_argument("--families", nargs="+", default=None,
                        help="only these families (experiments with a families= argument, e.g. mqar_head_to_head)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for name, (fn, out) in EXPERIMENTS.items():
            print(f"{name}: {fn.__doc__.splitlines()[0]} -> {out}")
        return 0
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; known: {', '.join(EXPERIMENTS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    fn, default_out = EXPERIMENTS[args.name]
    rank, world = train.init_distributed()  # (0, 1) unless started by torchrun
    kwargs = {"seeds": tuple(range(args.seeds)), "progress": rank == 0}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.device is not None:
        if "device" not in inspect.signature(fn).parameters:
            parser.error(f"{args.name} runs on the CPU only (it takes no device)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        kwargs["device"] = args.device
    if args.families is not None:
        kwargs["families"] = tuple(args.families)
    commit = git_commit("seqbook")  # the code an experiment runs
    out = args.out if args.out is not None else ROOT / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save(record, complete):
        wall = time.perf_counter() - start
        if rank != 0:  # under torchrun every process holds the same record; the first one writes it
            return wall
        launcher = f"torchrun --nproc_per_node={world} -m" if world > 1 else "python -m"
        record = {"experiment": args.name, "command": f"{launcher} seqbook.experiments " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "complete": complete, "wall_seconds": round(wall, 1), "threads": args.threads, "processes": world,
                  "device": kwargs.get("device", "cpu"),
                  "machine": {"python": platform.python_version(), "torch": torch.__version__,
                              "processor": platform.machine(), "cpus": os.cpu_count()},
                  **record}  # fmt: skip
        out.write_text(json.dumps(record, indent=1) + "\n")
        return wall

    record = fn(**kwargs, on_run=lambda partial: save(partial, complete=False))
    wall = save(record, complete=True)
    if rank == 0:
        print(f"wrote {out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
