"""The trusted side of a sandbox: a proxy whose attributes are the student's functions.

A :class:`Submission` reads a notebook, keeps its exercise cells (and nothing
else), and runs them in a separate sandbox process
(:mod:`seqbook.grading.sandbox`).  ``submission.kf_predict(x, P, F, Q)`` sends
the arguments over a pipe and returns the student's result, rebuilt with
``torch.load(weights_only=True)``; whatever goes wrong on the other side comes
back as :class:`SubmissionError` with a short message for the gradebook:

- an exception in the student's function: ``kf_predict raised TypeError: ... (Exercise 1, line 4: ...)``;
- a cell that failed when it ran: ``kf_predict is not available: Exercise 1 failed: SyntaxError: ...``;
- a call or a cell that runs past ``call_timeout``: the sandbox is killed
  (its whole process group) and the message says ``timed out after Ns``; a
  function that timed out or crashed the process once fails at once on later
  calls, so one infinite loop costs one timeout, not one per test;
- a cell that hangs or kills the process when it runs is skipped when the
  sandbox restarts, so the other exercises are still graded.
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import sandbox as _sandbox
from .release import exercise_sources

SANDBOX_SCRIPT = Path(_sandbox.__file__).resolve()
STARTUP_TIMEOUT = 120.0  # importing torch under load; no student code runs before the reply


class SubmissionError(Exception):
    """Something in the student's code failed; the message goes to the gradebook."""


class _Dead(Exception):
    """The sandbox process is gone or stuck (internal)."""


# ---------------------------------------------------------------- uid drop


def _readable_by_others(path: Path) -> bool:
    """True when any user may reach ``path`` (o+x on every ancestor, o+r on it)."""
    path = path.resolve()
    try:
        for parent in list(path.parents)[::-1]:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _unprivileged_user():
    """(uid, gid) of ``nobody`` when running as root and ``nobody`` can run Python here."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None
    needed = [Path(sys.executable), SANDBOX_SCRIPT, Path(os.__file__).parent]
    needed += [Path(p) for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)]
    if all(_readable_by_others(p) for p in needed):
        return user.pw_uid, user.pw_gid
    return None


# ---------------------------------------------------------------- pipes with deadlines


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        _, writable, _ = select.select([], [fd], [], remaining)
        if not writable:
            raise TimeoutError
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue
        except (BrokenPipeError, OSError) as exc:
            raise _Dead(f"the pipe closed ({exc})") from None


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks = []
    while n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise _Dead("the process ended")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: float) -> dict:
    (size,) = _sandbox.HEADER.unpack(_read_exact(fd, _sandbox.HEADER.size, deadline))
    if size > _sandbox.MAX_MESSAGE:
        raise _Dead(f"it sent {size} bytes, over the {_sandbox.MAX_MESSAGE >> 20} MiB limit")
    data = _read_exact(fd, size, deadline)
    try:
        message = _sandbox.decode(data)  # weights_only=True: tensors and plain containers only
    except Exception as exc:
        raise _Dead(f"it sent a message the grader cannot read ({type(exc).__name__})") from None
    if not isinstance(message, dict) or "kind" not in message:
        raise _Dead("it sent a malformed message")
    return message


def _defined_names(source: str) -> set[str]:
    """Top-level function names a cell defines (by parsing; a regex if it does not parse)."""
    try:
        tree = ast.parse(source)
        return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    except SyntaxError:
        import re

        return set(re.findall(r"^def\s+(\w+)", source, flags=re.M))


# ---------------------------------------------------------------- the proxy


class Submission:
    """The student's exercise functions, each running in the sandbox.

    notebook: path of the submitted ``.ipynb``; call_timeout: seconds for each
    call and each cell; memory_mb: the sandbox's data memory limit; cpu_seconds:
    its CPU time limit; fsize_mb: the largest file it may write.
    """

    def __init__(self, notebook, *, call_timeout: float = 10.0, memory_mb: int = 4096,
                 cpu_seconds: int = 300, fsize_mb: int = 16, forbid: dict | None = None):
        self._notebook = Path(notebook)
        self._call_timeout = float(call_timeout)
        self._limits = {"memory_mb": int(memory_mb), "cpu_seconds": int(cpu_seconds),
                        "fsize_mb": int(fsize_mb)}
        with open(self._notebook, encoding="utf-8") as f:
            nb = json.load(f)
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or nb.get("nbformat", 4) < 4:
            raise ValueError("not a Jupyter notebook in format 4 (save it with a current Jupyter)")
        self.sources = exercise_sources(nb)
        # function -> {"names": library functions, "aten": operators, "why": ...} it may not use
        # (see seqbook.grading.plugin, FORBIDDEN); labelled with the exercise that defines it.
        self._forbid = {}
        for name, rules in (forbid or {}).items():
            cells = [k for k, source in enumerate(self.sources, start=1) if name in _defined_names(source)]
            self._forbid[name] = dict(rules, exercise=f"Exercise {cells[0]}" if cells else "")
        self.cell_errors: dict[int, str] = {}  # exercise number -> why the cell failed
        self.layers: dict = {}
        self.functions: list[str] = []
        self._skip: set[int] = set()
        self._broken: dict[str, str] = {}  # function name -> why later calls fail at once
        self._proc = None
        self._dir = None
        self._next_id = 0
        self._drop = _unprivileged_user()

    # -- public

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    def call(self, name: str, *args, **kwargs):
        """Call the student's function ``name``; SubmissionError when it fails."""
        if name in self._broken:
            raise SubmissionError(self._broken[name])
        self._ensure_started()
        if name not in self.functions:
            raise SubmissionError(self._missing(name))
        self._next_id += 1
        request = {"kind": "call", "id": self._next_id, "name": name, "args": list(args), "kwargs": kwargs}
        data = _sandbox.encode(request)
        deadline = time.monotonic() + self._call_timeout
        try:
            _write_all(self._to_child, _sandbox.HEADER.pack(len(data)) + data, deadline)
            reply = _recv(self._from_child, deadline)
        except TimeoutError:
            self._kill()
            self._broken[name] = f"{name} timed out after {self._call_timeout:g}s"
            raise SubmissionError(self._broken[name]) from None
        except _Dead as exc:
            why = self._death(exc)
            self._kill()
            self._broken[name] = f"{name} crashed the sandbox process: {why}"
            raise SubmissionError(self._broken[name]) from None
        if reply.get("kind") != "result" or reply.get("id") != self._next_id:
            self._kill()
            raise SubmissionError(f"{name}: the sandbox answered out of turn (output written to its pipe?)")
        if not reply.get("ok"):
            raise SubmissionError(f"{name} raised {reply.get('error', '?')}")
        return reply.get("value")

    def cells(self) -> list[dict]:
        """Per exercise cell: did it run (available after the first call)."""
        return [{"exercise": k, "ok": k not in self.cell_errors, "error": self.cell_errors.get(k, "")}
                for k in range(1, len(self.sources) + 1)]

    def close(self) -> None:
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the process

    def _missing(self, name: str) -> str:
        if not self.sources:
            return (f"{name} is not available: the notebook has no code cell tagged 'exercise' "
                    "(were the cell tags removed?)")
        for k, source in enumerate(self.sources, start=1):
            if name in _defined_names(source) and k in self.cell_errors:
                return f"{name} is not available: Exercise {k} failed: {self.cell_errors[k]}"
        failed = "; ".join(f"Exercise {k}: {e}" for k, e in sorted(self.cell_errors.items()))
        return f"the notebook defines no function {name!r}" + (f" (failed cells: {failed})" if failed else "")

    def _death(self, exc: Exception) -> str:
        code = self._proc.poll() if self._proc else None
        if code is None and self._proc is not None:
            try:
                code = self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        if code is not None:
            return f"exit code {code}"
        return str(exc)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole group goes
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def _spawn(self):
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="seqbook-sandbox-"))
            shutil.copyfile(self._notebook, self._dir / "submission.ipynb")
        home = self._dir
        env = {
            "PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home), "MPLCONFIGDIR": str(home),
            "TRITON_CACHE_DIR": str(home), "XDG_CACHE_HOME": str(home), "TORCH_HOME": str(home),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "LANG": "C.UTF-8",
        }
        log = open(home / "sandbox.log", "ab")
        cfg = dict(self._limits, parent_pid=os.getpid(), sandbox_dir=str(home), dropped_to=None,
                   forbid=self._forbid)
        extra = {}
        if self._drop:
            uid, gid = self._drop
            for path in (home, home / "submission.ipynb", home / "sandbox.log"):
                os.chown(path, uid, gid)
            cfg["dropped_to"] = "nobody"
            extra = dict(user=uid, group=gid, extra_groups=[])
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(SANDBOX_SCRIPT), str(to_child_r), str(from_child_w),
                 json.dumps(cfg)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=home, env=env, start_new_session=True, **extra)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
            log.close()
        os.set_blocking(to_child_w, False)
        self._proc, self._to_child, self._from_child = proc, to_child_w, from_child_r

    def _log_tail(self) -> str:
        try:
            lines = (self._dir / "sandbox.log").read_text(errors="replace").strip().splitlines()
            return lines[-1][:300] if lines else ""
        except OSError:
            return ""

    def _start_once(self) -> bool:
        """Start the sandbox and run the cells; False when a cell hung or crashed it."""
        self._spawn()
        try:
            hello = _recv(self._from_child, time.monotonic() + STARTUP_TIMEOUT)
        except (TimeoutError, _Dead) as exc:
            why = self._death(exc) if isinstance(exc, _Dead) else "no reply"
            tail = self._log_tail()
            self._kill()
            if self._drop:  # this machine's nobody cannot run it after all: stay, and lock in harder
                self._drop = None
                return False
            raise SubmissionError(f"the grader could not start the sandbox ({why}) {tail}".strip()) from None
        self.layers = hello.get("layers", {})
        cells = [None if k in self._skip else s for k, s in enumerate(self.sources, start=1)]
        data = _sandbox.encode({"kind": "init", "cells": cells})
        try:
            _write_all(self._to_child, _sandbox.HEADER.pack(len(data)) + data, time.monotonic() + 30)
        except (TimeoutError, _Dead):
            self._kill()
            raise SubmissionError("the sandbox stopped before running the cells") from None
        for k in range(1, len(self.sources) + 1):
            if k in self._skip:
                continue
            try:
                reply = _recv(self._from_child, time.monotonic() + self._call_timeout)
            except TimeoutError:
                self.cell_errors[k] = f"timed out after {self._call_timeout:g}s when the cell ran"
            except _Dead as exc:
                self.cell_errors[k] = f"the cell crashed the sandbox process ({self._death(exc)})"
            else:
                if reply.get("kind") == "cell" and reply.get("exercise") == k:
                    if reply["ok"]:
                        self.cell_errors.pop(k, None)
                    else:
                        self.cell_errors[k] = str(reply.get("error", "?"))
                    continue
                self.cell_errors[k] = "the cell wrote to the grader's pipe"
            self._skip.add(k)
            self._kill()
            return False
        try:
            ready = _recv(self._from_child, time.monotonic() + self._call_timeout)
            self.functions = [str(f) for f in ready.get("functions", [])]
        except (TimeoutError, _Dead):
            self._kill()
            raise SubmissionError("the sandbox stopped after running the cells") from None
        return True

    def _ensure_started(self) -> None:
        if self._proc is not None:
            return
        # Each failed start skips one more cell (or gives up the uid drop), so this ends.
        for _ in range(len(self.sources) + 2):
            if self._start_once():
                return
        raise SubmissionError("the sandbox could not run the exercise cells")
