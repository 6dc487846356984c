"""Every Triton kernel compiles for a Hopper GPU (sm_90), here, without one.

The kernel tests run the kernels in the Triton interpreter on this machine; the interpreter
accepts code that the compiler would reject (block shapes it cannot lay out, a shared-memory
budget exceeded, constructs it does not lower). ``benchmarks.compile_check`` drives every
kernel through its launcher and compiles it down to a cubin for sm_90 with the ptxas in
Triton's wheel, launching nothing; it runs in its own process (it needs the interpreter off)
with an empty kernel cache (so that it compiles rather than finds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    # About 15 minutes of ptxas on one core of the 2-core CI machine while the other runs the notebooks
    # (2026-12-03: the float32 cases of linear attention, the delta rule and RWKV-7 take a minute each);
    # 900 s was exceeded there, so the limit only guards against a hang.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2700)  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "\n0 failure(s)" in proc.stdout, report[-4000:]
    compiled = [line for line in proc.stdout.splitlines() if " ok " in line]
    assert len(compiled) >= 43, f"expected 43 cases, each compiling its kernels:\n{proc.stdout}"
    for kernel in ("_scan_fwd", "_vandermonde_bwd", "_cauchy_bwd", "_selective_scan_fwd_chunked", "_ssd_fwd",
                   "_attn_fwd", "_attn_fwd_ws", "_attn_bwd_dkdv", "_attn_bwd_dq", "_ladder_kernel", "_state_pass",
                   "_chunk_out", "_chunk_grads"):  # fmt: skip
        assert kernel in proc.stdout, f"{kernel} was not compiled:\n{proc.stdout}"
