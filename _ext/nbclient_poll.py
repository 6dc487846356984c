"""Sphinx extension: wait for a kernel's replies in one-second polls while the book executes.

Why. myst-nb executes each notebook with nbclient, which waits for a cell's reply with one
``poll`` of the kernel's shell socket, as long as the cell time-out (``execute.timeout`` in
book.yml: 600 s). On a busy machine that poll can miss the wake-up for a reply that has
already arrived: the kernel sits idle, the client sleeps in its event loop, and only when the
poll's timer fires does pyzmq look at the socket again, find the reply and carry on, with
no error. One chapter-1 build took 684 s (22 s of work) that way, and a run of the notebook
under nbclient on this 2-core machine took 639 s of which its cells took 36 s (the kernel's own
timestamps), both processes asleep in ``epoll_wait`` for the ten minutes between.

What. The asyncio kernel client's ``get_msg`` polls in slices of at most one second until its
time-out: each slice ends with pyzmq's non-blocking look at the socket, so a missed wake-up
costs at most a second. Time-outs and cancellation behave as before. It patches the client
class of this process only (the build's), not the kernels, and not nbval or JupyterLab.
"""

from __future__ import annotations

import time
from queue import Empty

from jupyter_client.channels import AsyncZMQSocketChannel

#: Longest single poll, in seconds: the most a missed wake-up can cost.
SLICE_S = 1.0


async def get_msg(self, timeout: float | None = None) -> dict:
    """Like ``AsyncZMQSocketChannel.get_msg``, polling in slices of at most ``SLICE_S``."""
    assert self.socket is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SLICE_S if deadline is None else min(SLICE_S, max(0.0, deadline - time.monotonic()))
        if await self.socket.poll(int(left * 1000)):  # 0 ms: pyzmq's immediate, non-blocking check
            return await self._recv()
        if deadline is not None and time.monotonic() >= deadline:
            raise Empty


def patch() -> None:
    AsyncZMQSocketChannel.get_msg = get_msg


def setup(app) -> dict:
    patch()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
