"""The per-thread pool of CPU work buffers (mergekit_pcb.work_buffers), alone and under pcb."""

from __future__ import annotations

import threading

import torch

from mergekit_pcb import work_buffers as pool
from mergekit_pcb.pcb import PCBOptions, balanced_rows, pcb_merge
from mergekit_pcb.work_buffers import (
    flat_float32,
    pooled_bytes,
    release_work_buffers,
    work_buffers,
)
from tests.tie_heavy import tie_heavy_models

CPU = torch.device("cpu")


def _pointers(buffers: list[torch.Tensor]) -> set[int]:
    return {buffer.data_ptr() for buffer in buffers}


def test_a_later_call_reuses_the_kept_buffers():
    release_work_buffers()
    with work_buffers(3, 1000, CPU) as first:
        assert [(b.numel(), b.dtype) for b in first] == [(1000, torch.float32)] * 3
        kept = _pointers(first)
    assert pooled_bytes() == 3 * 4000
    with work_buffers(3, 1000, CPU) as again:
        assert _pointers(again) == kept
    with work_buffers(2, 10, CPU) as smaller:  # views of kept buffers
        assert _pointers(smaller) <= kept and [b.numel() for b in smaller] == [10, 10]
    release_work_buffers()
    assert pooled_bytes() == 0


def test_buffers_in_use_are_never_handed_out_twice():
    release_work_buffers()
    with work_buffers(2, 1000, CPU) as outer, work_buffers(2, 1000, CPU) as inner:
        assert len(_pointers(outer) | _pointers(inner)) == 4
    assert pooled_bytes() == 4 * 4000


def test_the_pool_keeps_the_largest_buffers_that_fit(monkeypatch):
    monkeypatch.setattr(pool, "POOL_BYTES", 40_000)
    monkeypatch.setattr(pool, "POOL_BUFFER_BYTES", 40_000)
    release_work_buffers()
    with work_buffers(3, 2000, CPU):  # 3 x 8,000 bytes
        pass
    assert pooled_bytes() == 24_000
    with work_buffers(3, 4000, CPU):  # 3 x 16,000 bytes: the kept ones are too small
        pass
    # Largest first, each one that still fits: 16,000 + 16,000 + 8,000.
    assert pooled_bytes() == 40_000
    release_work_buffers()


def test_buffers_over_the_per_buffer_limit_are_not_kept(monkeypatch):
    monkeypatch.setattr(pool, "POOL_BUFFER_BYTES", 4000)
    release_work_buffers()
    with work_buffers(2, 1000, CPU):  # 4,000 bytes each: kept
        pass
    with work_buffers(2, 1001, CPU):  # 4,004 bytes each: allocated for this call only
        pass
    assert pooled_bytes() == 2 * 4000
    release_work_buffers()


def test_each_thread_has_its_own_pool():
    release_work_buffers()
    with work_buffers(1, 1000, CPU) as (mine,):
        pass
    seen = {}

    def other() -> None:
        seen["pooled before"] = pooled_bytes()
        with work_buffers(1, 1000, CPU) as (theirs,):
            seen["pointer"] = theirs.data_ptr()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["pooled before"] == 0 and seen["pointer"] != mine.data_ptr()
    assert pooled_bytes() == 4000
    release_work_buffers()


def test_other_devices_allocate_per_call():
    release_work_buffers()
    with work_buffers(2, 1000, torch.device("meta")) as buffers:
        assert all(b.device.type == "meta" and b.numel() == 1000 for b in buffers)
    assert pooled_bytes() == 0


def test_flat_float32_is_the_input_itself_or_a_converted_copy():
    x = torch.randn(3, 4)
    with flat_float32(x) as flat:
        assert flat.shape == (12,) and flat.data_ptr() == x.data_ptr()
    half = x.to(torch.bfloat16)
    with flat_float32(half) as flat:
        assert flat.dtype == torch.float32 and torch.equal(flat, half.float().reshape(-1))


def test_work_buffers_are_never_shared_or_returned():
    base, finetuned = tie_heavy_models(3, 100_000, seed=10)
    kwargs = {"weights": [1.0, 0.5, 2.0], "densities": [0.2] * 3}
    first = pcb_merge(base.float(), [f.float() for f in finetuned], **kwargs)
    kept = first.clone()
    pcb_merge(base, finetuned, **kwargs)  # same size: reuses the kept buffers
    assert torch.equal(first, kept)

    # Two row generators alive at once (nested callers) each get their own buffers.
    base32 = base.float()
    rows = balanced_rows(base32, finetuned, [0.2] * 3, PCBOptions())
    alone = {row.model: row.scale().clone() for row in rows}
    outer = balanced_rows(base32, finetuned, [0.2] * 3, PCBOptions())
    row = next(outer)
    scale = row.scale()
    held = scale.clone()
    rows = balanced_rows(base32, finetuned, [0.1] * 3, PCBOptions())
    inner = {row.model: row.scale().clone() for row in rows}
    assert torch.equal(scale, held) and torch.equal(held, alone[row.model])
    assert all(torch.equal(later.scale(), alone[later.model]) for later in outer)
    assert inner.keys() == alone.keys()
    release_work_buffers()
    assert torch.equal(pcb_merge(base.float(), [f.float() for f in finetuned], **kwargs), kept)
