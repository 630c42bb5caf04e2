"""CPU inference: the block's elementwise ops on one OpenMP thread, the frozen layer's products on all of them.

Why (issue 4, BENCHMARKS.md): this package runs nnU-Net with ``OMP_WAIT_POLICY=PASSIVE`` (environment.py), because
spin-waiting OpenMP threads fight nnU-Net's augmentation and export workers for the cores. Idle OpenMP threads then
sleep, and every parallel region pays for waking them: about 50 µs on the 2-core benchmark machine, while an
elementwise op over one tile's 175 x 576 tokens takes about 8 µs on one thread. The block runs some 60 such ops per
tile. Here they run on one thread; the layer's linears (``OneDNNLinear``) and attention (``bidirectional_sdpa``)
take all threads back through ``all_threads`` (in any dtype). The rank-r projections stay on one thread: their four
small products took 355 µs per tile that way against 430 µs on two threads. Results are bit-identical (elementwise
ops do not depend on the thread count; the products run as before). Only inference (no autograd) on the CPU, outside
torch.compile; training batches are large enough for the threads to pay off.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_threads = threading.local()  # .all: the caller's thread count while an elementwise_on_one_thread block runs


@contextlib.contextmanager
def elementwise_on_one_thread(x: torch.Tensor) -> Iterator[None]:
    """Within this block, CPU inference on ``x``'s device runs on one thread, except inside ``all_threads``."""
    # is_compiling first: torch.get_num_threads() is a graph break that makes dynamo run the whole block eager
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or torch.is_grad_enabled()
            or getattr(_threads, "all", None) is not None or torch.get_num_threads() == 1):
        yield
        return
    n = torch.get_num_threads()
    _threads.all = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _threads.all = None


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Inside ``elementwise_on_one_thread``: the caller's thread count again (for matrix products); else nothing."""
    n = getattr(_threads, "all", None)
    if n is None:
        yield
        return
    _threads.all = None  # nested calls change nothing
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)
        _threads.all = n
