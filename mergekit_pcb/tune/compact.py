"""Compact storage of one model's contribution to one tensor, and adding it to a merge.

A ``pcb`` contribution ``c_i`` is zero outside the entries model ``i`` kept (about
``density`` of them), so it is stored as the kept values and their positions:

* positions as gaps between successive kept entries, one ``uint8`` each; a gap longer
  than 255 is bridged by filler entries (gap 255, value 0), so a stretch of ``L``
  dropped entries costs at most ``L / 255`` extra entries. Decoding is one
  ``cumsum``, and adding to the merge one ``index_add_``: both stream, on CPU and GPU;
* values in float32, or in the merge dtype (bf16, fp16) when every value is exactly
  representable there (``task_arithmetic``'s deltas of bf16 models are);
* a contribution that is dense enough that this would not save space (``linear``,
  ``task_arithmetic``, ``pcb`` at density 1) is stored dense, in the same value dtype.

At density 0.2 a ``pcb`` row takes about 0.2 x (1 + 4) = 1 byte per parameter,
against 4 for the dense float32 row. Pure torch; no mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MAX_GAP = 255


@dataclass(frozen=True)
class CompactRow:
    """One model's contribution to one flat tensor of ``numel`` entries.

    ``gaps`` is None for a dense row (then ``values`` has ``numel`` entries).
    """

    numel: int
    values: torch.Tensor
    gaps: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        size = self.values.numel() * self.values.element_size()
        return size + (0 if self.gaps is None else self.gaps.numel())

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> CompactRow:
        gaps = None if self.gaps is None else self.gaps.to(device)
        return CompactRow(self.numel, self.values.to(device), gaps)

    def positions(self) -> torch.Tensor:
        """Flat indices of the stored values (int64), fillers included."""
        if self.gaps is None:
            return torch.arange(self.numel, device=self.values.device)
        return torch.cumsum(self.gaps, 0, dtype=torch.int64)

    def add_to(self, out: torch.Tensor, alpha: float) -> None:
        """``out += alpha * c`` for a flat float32 ``out`` of ``numel`` entries."""
        values = self.values if self.values.dtype == out.dtype else self.values.to(out.dtype)
        if self.gaps is None:
            out.add_(values, alpha=alpha)
        elif values.numel():
            # int32 indices: half the traffic of int64, and index_add_ takes them.
            index = torch.cumsum(self.gaps, 0, dtype=torch.int32)
            out.index_add_(0, index, values, alpha=alpha)

    def dense(self) -> torch.Tensor:
        """The contribution as a flat float32 tensor (for checks and tests)."""
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        self.add_to(out, 1.0)
        return out

    def divided(self, divisor: torch.Tensor) -> CompactRow:
        """This row divided, at each stored position, by the flat float32 ``divisor``."""
        at = divisor if self.gaps is None else divisor[self.positions()]
        return CompactRow(self.numel, self.values.float() / at, self.gaps)


def value_dtype(values: torch.Tensor, merge_dtype: torch.dtype) -> torch.dtype:
    """``merge_dtype`` if it holds every one of ``values`` exactly, else float32."""
    if merge_dtype in (torch.float32, torch.float64) or not merge_dtype.is_floating_point:
        return torch.float32
    if values.numel() and not torch.equal(values.to(merge_dtype).to(values.dtype), values):
        return torch.float32
    return merge_dtype


def compact(contribution: torch.Tensor, merge_dtype: torch.dtype = torch.float32) -> CompactRow:
    """Store a flat float32 contribution in the smaller of the sparse and dense forms."""
    flat = contribution.reshape(-1)
    numel = flat.numel()
    nonzero = flat.nonzero().squeeze(1)
    if nonzero.numel() == 0:
        return CompactRow(numel, flat.new_empty(0), flat.new_empty(0, dtype=torch.uint8))
    gaps = torch.diff(nonzero, prepend=nonzero.new_zeros(1))
    # Every gap longer than _MAX_GAP becomes ceil(gap / 255) entries: fillers of 255
    # (value 0) and a last one that lands on the kept entry. The first gap may be 0.
    entries = torch.clamp((gaps + _MAX_GAP - 1) // _MAX_GAP, min=1)
    total = int(entries.sum())
    dtype = value_dtype(flat[nonzero], merge_dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if total * (1 + itemsize) >= numel * itemsize:
        return CompactRow(numel, flat.to(dtype, copy=True))
    last = torch.cumsum(entries, 0) - 1
    packed = torch.full((total,), _MAX_GAP, dtype=torch.uint8, device=flat.device)
    packed[last] = (gaps - _MAX_GAP * (entries - 1)).to(torch.uint8)
    values = torch.zeros(total, dtype=dtype, device=flat.device)
    values[last] = flat[nonzero].to(dtype)
    return CompactRow(numel, values, packed)
