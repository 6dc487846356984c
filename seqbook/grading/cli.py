"""Command line: ``python -m seqbook.grading release|grade`` (also ``seqbook-grade``).

    python -m seqbook.grading release chapters --out release
    python -m seqbook.grading grade submissions --out gradebook [--tests tests/grading]
        [--timeout 120] [--call-timeout 10] [--memory-mb 4096] [--jobs N]
"""

from __future__ import annotations

import argparse
import sys

from .grade import grade
from .release import release_tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqbook.grading",
                                     description="Release exercises to students, and grade their notebooks.")
    commands = parser.add_subparsers(dest="command", required=True)

    rel = commands.add_parser("release", help="write the student release of every notebook with exercises")
    rel.add_argument("chapters", help="folder of chapter notebooks (chapters/NN_topic/*.ipynb)")
    rel.add_argument("--out", default="release", help="output folder (default: release)")

    gr = commands.add_parser(
        "grade", help="grade a folder of submitted notebooks into a gradebook",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Grade a folder of submitted notebooks into gradebook.csv and gradebook.json.",
        epilog="""who is a student:
  the folder's name for <student>/<any>.ipynb, else the file's name without .ipynb
  and without a trailing copy number " (2)"; names are compared after Unicode NFKC
  normalization, case folding and collapsing spaces (Alice.ipynb, "alice (1).ipynb"
  and alice/kalman.ipynb are one student, "alice"). Names holding control or
  invisible characters (newlines, escapes) are refused with an error row.
one notebook per student and chapter:
  the newest is graded (latest modification time, then the higher copy number,
  then the later path); the others are listed as "ignored" with a warning.""")
    gr.add_argument("submissions", help="folder holding <student>.ipynb or <student>/<any>.ipynb (or one .ipynb)")
    gr.add_argument("--out", default="gradebook", help="gradebook folder (default: gradebook)")
    gr.add_argument("--tests", default="tests/grading", help="grading tests, test_<chapter>.py (default: tests/grading)")
    gr.add_argument("--chapters", default="chapters", help="chapter folders, to match notebooks by file name")
    gr.add_argument("--timeout", type=float, default=120.0, help="wall-clock seconds for one notebook (default: 120)")
    gr.add_argument("--call-timeout", type=float, default=10.0,
                    help="seconds for each exercise cell and each call into the student's code (default: 10)")
    gr.add_argument("--memory-mb", type=int, default=4096, help="memory limit of each sandbox, MiB (default: 4096)")
    gr.add_argument("--jobs", type=int, default=None, help="notebooks graded at once (default: min(4, CPUs))")

    args = parser.parse_args(argv)
    try:
        if args.command == "release":
            written = release_tree(args.chapters, args.out)
            for path in written:
                print(f"wrote {path}")
            print(f"{len(written)} notebook(s) with exercises released into {args.out}")
        else:
            grade(args.submissions, args.out, args.tests, timeout=args.timeout, call_timeout=args.call_timeout,
                  memory_mb=args.memory_mb, jobs=args.jobs, chapters_dir=args.chapters)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
