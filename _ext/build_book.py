"""`make book`: build the site with Jupyter Book and say, as it goes, what each notebook cost.

Run as ``python _ext/build_book.py [--toc toc.yml] [--config book.yml] [--path-output DIR]``.

Jupyter Book's own output passes through unchanged; this script adds one line per notebook
(executed, and in how many seconds, or served from the cache) and a summary with the total.

Why a wrapper and not a bare ``jupyter-book build``:

* **A failed cell fails the build, and is re-executed next time.** The build runs with
  warnings as errors and *without* ``--keep-going``: the first failure (a cell's exception,
  a cell time-out, a bad reference) stops Sphinx before it saves its environment, so the
  next build reads the notebook again instead of trusting the page it half-built. myst-nb
  caches only successful executions (``_build/.jupyter_cache``), so the failed notebook
  is executed again, and the ones that succeeded come from the cache.
* **No published traceback.** After a successful build, every page is scanned for an error
  output (a traceback or an ``ename``); one is a failure too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
READING = re.compile(r"reading sources\.\.\. \[\s*\d+%\] (\S+)")
EXECUTED = re.compile(r"Executed notebook in ([0-9.]+) seconds")
CACHED = re.compile(r"Using cached notebook: ID=(\d+)")
FAILED = re.compile(r"Executing notebook failed|CellExecutionError|CellTimeoutError|ExecutionError")
# What myst-nb writes for an error output (a traceback lexer, or the `output error` class).
ERROR_OUTPUT = re.compile(r'class="[^"]*\b(?:output traceback|highlight-ipythontb|output error)\b')


def cached_seconds(cache: Path, pk: str) -> float | None:
    """How long the cached notebook took when it was executed (jupyter-cache keeps it)."""
    try:
        from jupyter_cache import get_cache

        return get_cache(str(cache)).get_cache_record(int(pk)).data.get("execution_seconds")
    except Exception:  # the summary line is informative only: never fail the build on it
        return None


def say(text: str) -> None:
    print(f"[book] {text}", flush=True)


def published_errors(html: Path) -> list[str]:
    """Pages of the built site that show an error output."""
    return sorted(str(page.relative_to(html)) for page in html.rglob("*.html")
                  if "_static" not in page.parts and ERROR_OUTPUT.search(page.read_text(errors="replace")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toc", default="toc.yml")
    parser.add_argument("--config", default="book.yml")
    parser.add_argument("--path-output", default=None, help="where _build goes (default: the repository)")
    parser.add_argument("source", nargs="?", default=str(ROOT))
    args = parser.parse_args(argv)

    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", args.source, "--config", args.config, "--toc", args.toc,
               "--warningiserror"]
    if args.path_output:
        command += ["--path-output", args.path_output]
    build = Path(args.path_output or args.source) / "_build"
    say("building the book: each notebook is executed unless the cache holds its current code")
    start = time.monotonic()
    current, began, rows = None, None, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as process:
        for raw in process.stdout:
            sys.stdout.write(raw)
            sys.stdout.flush()
            line = ANSI.sub("", raw)
            if match := READING.search(line):
                current, began = match.group(1), time.monotonic()
            elif match := EXECUTED.search(line):
                rows.append((current, "executed", float(match.group(1))))
                say(f"{current}: executed in {float(match.group(1)):.1f} s "
                    f"(elapsed {time.monotonic() - start:.0f} s)")
            elif match := CACHED.search(line):
                seconds = cached_seconds(build / ".jupyter_cache", match.group(1))
                rows.append((current, "cached", seconds))
                said = f", executed earlier in {seconds:.1f} s" if seconds is not None else ""
                say(f"{current}: from the cache{said}")
            elif FAILED.search(line) and current and (current, "FAILED") not in [r[:2] for r in rows]:
                rows.append((current, "FAILED", time.monotonic() - began))
    total = time.monotonic() - start

    if not rows and process.returncode == 0:
        say("no notebook changed since the last build: nothing executed")
    if rows:
        say("notebooks:")
        for name, how, seconds in rows:
            print(f"[book]   {how:9s} {'' if seconds is None else f'{seconds:7.1f} s'}  {name}")
    if process.returncode != 0:
        failed = [name for name, how, _ in rows if how == "FAILED"]
        where = f" in {failed[0]}" if failed else (f" (the last page read: {current})" if current else "")
        say(f"FAILED{where} after {total:.0f} s (exit code {process.returncode}); the cause is above.")
        say("Nothing failed is cached: fix it and run `make book` again (`make clean` starts from scratch).")
        return process.returncode or 1
    bad = published_errors(build / "html")
    if bad:
        say(f"FAILED: pages show an error output: {', '.join(bad)}")
        return 1
    say(f"built in {total:.0f} s: open {build / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
