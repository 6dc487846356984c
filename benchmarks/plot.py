"""Plots and tables from the committed result files (no GPU needed).

``python -m benchmarks.plot [FILES...] [--out DIR]`` draws, for every result file (default:
the newest in ``benchmarks/results/`` for each GPU) and every op timed at three or more
lengths, time against length on log-log axes, one line per implementation, with the
floor (bytes over the measured copy bandwidth) dashed; saved as
``<DIR>/<file stem>-<op>.png``. The book's benchmark page calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED = ("device", "date", "commit", "torch", "triton", "ceilings", "rows")
ROW_FIELDS = ("op", "impl", "shape", "ms", "tflops", "tbps", "floor_fraction")


def load(paths=None) -> list[dict]:
    """The result files (default: all of ``benchmarks/results/*.json``), oldest first; each
    dict gains ``"file"``, its name. Raises ``ValueError`` for a file off the schema."""
    paths = sorted(Path(p) for p in paths) if paths else sorted(RESULTS.glob("*.json"))
    results = []
    for path in paths:
        result = json.loads(path.read_text())
        missing = [k for k in REQUIRED if k not in result]
        if missing:
            raise ValueError(f"{path.name}: missing fields {missing} (see shared/GPU.md, 'Result files')")
        for row in result["rows"]:
            if any(k not in row for k in ("op", "impl", "shape", "ms")):
                raise ValueError(f"{path.name}: a row lacks op, impl, shape or ms: {row}")
        result["file"] = path.name
        results.append(result)
    return results


def newest_per_device(results: list[dict]) -> list[dict]:
    """The newest file of each (device, set of op families): later runs supersede earlier ones."""
    newest = {}
    for r in sorted(results, key=lambda r: (r["date"], r["file"])):
        families = tuple(sorted({row["op"].split(".")[0] for row in r["rows"]}))
        newest[(r["device"], families)] = r
    return list(newest.values())


def parse_shape(shape: str) -> tuple[dict, str]:
    """'B=4,L=4096,D=2048,fp32' -> ({'B': '4', 'L': '4096', 'D': '2048'}, 'B=4,D=2048,fp32')."""
    fields = dict(p.split("=", 1) for p in shape.split(",") if "=" in p)
    family = ",".join(p for p in shape.split(",") if not p.startswith("L="))
    return fields, family


def length_series(result: dict) -> dict:
    """``{(op, family): {impl: [(L, ms, floor_ms), ...]}}`` for every (op, family) timed at >= 3 lengths."""
    series = {}
    for row in result["rows"]:
        fields, family = parse_shape(row["shape"])
        if "L" not in fields:
            continue
        floor_ms = row["ms"] * row["floor_fraction"] if row.get("floor_fraction") else None
        series.setdefault((row["op"], family), {}).setdefault(row["impl"], []).append(
            (int(fields["L"]), row["ms"], floor_ms)
        )
    keep = {}
    for key, impls in series.items():
        lengths = {L for points in impls.values() for L, _, _ in points}
        if len(lengths) >= 3:
            keep[key] = {impl: sorted(points) for impl, points in impls.items()}
    return keep


def plot_lengths(result: dict, op: str, family: str, ax=None):
    """Time against length, log-log, one line per implementation, the floor dashed."""
    import matplotlib.pyplot as plt

    impls = length_series(result)[(op, family)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.2))
    floor = {}
    for impl, points in sorted(impls.items(), key=lambda kv: (not kv[0].startswith("seqbook"), kv[0])):
        lengths = [p[0] for p in points]
        ax.loglog(lengths, [p[1] for p in points], marker="o", ms=3, label=impl)
        for L, _, f in points:
            if f:
                floor[L] = f
    if floor:
        Ls = sorted(floor)
        ax.loglog(Ls, [floor[L] for L in Ls], "k--", lw=1,
                  label=f"floor: bytes / {result['ceilings']['copy_TBps']} TB/s")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("time (ms, median)")
    ax.set_title(f"{op}  ({family})\n{result['device']}, {result['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def checks(result: dict) -> dict:
    """The correctness checks of a file by family: ``{family: {"errors": ..., "failures": [...]}}``
    (files of one family may hold a single check, keyed here by their op family)."""
    found = result.get("check") or {}
    if "errors" in found:
        family = result["rows"][0]["op"].split(".")[0] if result["rows"] else ""
        return {family: found}
    return found


def summary(result: dict) -> list[dict]:
    """One line per (op, shape): each implementation's ms, and the kernel's TB/s, floor
    fraction and speed-up over the reference (None where absent)."""
    by = {}
    for row in result["rows"]:
        by.setdefault((row["op"], row["shape"]), {})[row["impl"]] = row
    lines = []
    for (op, shape), impls in by.items():
        kernel, ref = impls.get("seqbook.triton"), impls.get("seqbook.reference")
        lines.append({
            "op": op, "shape": shape, "ms": {impl: row["ms"] for impl, row in impls.items()},
            "tbps": kernel.get("tbps") if kernel else None,
            "floor_fraction": kernel.get("floor_fraction") if kernel else None,
            "speedup": ref["ms"] / kernel["ms"] if kernel and ref else None,
        })  # fmt: skip
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="result files (default: the newest per GPU)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the PNGs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load(args.files) if args.files else newest_per_device(load())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for result in results:
        for op, family in length_series(result):
            ax = plot_lengths(result, op, family)
            path = Path(args.out) / f"{Path(result['file']).stem}-{_slug(op)}-{_slug(family)}.png"
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
