"""Reusable float32 work buffers for the tensor math, pooled per thread on the CPU.

A fresh CPU buffer costs a page fault per 4 KiB page when first written, so the
buffers a merge of one tensor needs are taken from, and given back to, a pool that
the calling thread keeps between calls. Other devices allocate per call (CUDA's
caching allocator already reuses memory). Pure torch; knows nothing of PCB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Bytes of CPU work buffers each thread keeps between calls: 512 MiB holds the seven
#: buffers of a merge of any tensor up to 2^24 entries.
POOL_BYTES = 512 << 20

#: Larger buffers are allocated per call and never kept, so that one tensor's seven
#: buffers are kept together or not at all.
POOL_BUFFER_BYTES = POOL_BYTES // 8


class _FreeBuffers(threading.local):
    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []


_FREE = _FreeBuffers()


def pooled_bytes() -> int:
    """Bytes of work buffers the calling thread keeps for its next call."""
    return sum(4 * buffer.numel() for buffer in _FREE.buffers)


def release_work_buffers() -> None:
    """Free the CPU work buffers the calling thread keeps for its next call."""
    _FREE.buffers.clear()


@contextmanager
def work_buffers(count: int, numel: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """``count`` flat float32 buffers of ``numel`` entries (contents undefined).

    On the CPU they come from, and go back to, the calling thread's pool; a kept
    buffer larger than ``numel`` serves through a view. Buffers in use are out of
    the pool, so nested or interleaved callers never share one. After the call the
    pool keeps the largest buffers that fit in ``POOL_BYTES``.
    """
    if device.type != "cpu" or 4 * numel > POOL_BUFFER_BYTES:
        yield [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(count)]
        return
    free = _FREE.buffers
    fits = sorted((b for b in free if b.numel() >= numel), key=torch.Tensor.numel)[:count]
    free[:] = [b for b in free if all(b is not f for f in fits)]
    taken = fits + [torch.empty(numel, dtype=torch.float32) for _ in range(count - len(fits))]
    try:
        yield [b[:numel] for b in taken]
    finally:
        kept, total = [], 0
        for buffer in sorted([*free, *taken], key=torch.Tensor.numel, reverse=True):
            if total + 4 * buffer.numel() <= POOL_BYTES:
                kept.append(buffer)
                total += 4 * buffer.numel()
        free[:] = kept


@contextmanager
def flat_float32(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor`` flat in float32: itself if it is, else a copy in a work buffer.

    Converted once: mixed-dtype arithmetic (float32 with bfloat16) is several times
    slower than either alone.
    """
    flat = tensor.reshape(-1)
    if flat.dtype == torch.float32:
        yield flat
        return
    with work_buffers(1, flat.numel(), flat.device) as (buffer,):
        yield buffer.copy_(flat)
