"""Exact whole-model PCB statistics in bounded memory (``scope: model``).

The authors' PCB takes its min-max normalisations and quantiles over the whole
flattened model. This module computes, per model, exactly those statistics
(:class:`mergekit_pcb.core.ModelStats`) by streaming over the tensors, never holding
more than one tensor's task vectors:

* exact quantiles by two-pass radix selection on the float32 bit patterns: a
  65,536-bin histogram of the upper 16 bits finds the bin holding the k-th value,
  a second histogram of the lower 16 bits inside that bin finds the value itself;
* pass 1-2 select the outlier-clamp quantiles of ``|t|`` (or its min/max when the
  clamp is off), pass 3-4 the (1 - density) quantile and the maximum of the score,
  which needs the clamp bounds first.

Every buffer lives on the device of the tensors streamed (CUDA with ``--cuda``):
the histograms are made by counting the values they receive, and only a chosen
histogram's cumulative counts come to the host, to find a rank's bin.

Pure tensor code: the caller supplies a function that iterates over
``(name, base, [finetuned...])`` for every tensor (see ``method.py`` for mergekit).
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from mergekit_pcb.core import (
    ModelStats,
    NonFiniteInputError,
    PCBOptions,
    balance,
    clamp_indices,
    column_sum,
    drop_index,
    task_vector,
)

LOG = logging.getLogger(__name__)

TensorStream = Callable[[], Iterable[tuple[str, torch.Tensor, Sequence[torch.Tensor]]]]

_BINS = 1 << 16
_CHUNK = 1 << 22  # elements per histogram update: bounds the int64 key temporaries


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order backwards by their bits: flip their 31 value bits.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _key_to_float(key: int) -> float:
    """Inverse of ``_sortable_keys`` for one key, in plain Python (no device involved)."""
    bits = key - (1 << 31)
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _cumulative(histogram: torch.Tensor) -> list[int]:
    # To the host once (65,536 integers), so that the rank lookups are host
    # arithmetic whatever device the histogram was counted on.
    return histogram.cumsum(0).tolist()


def _rank_in(cumulative: list[int], rank: int) -> tuple[int, int]:
    """Bin holding the value of 0-based ``rank``, and the rank within that bin."""
    index = bisect.bisect_right(cumulative, rank)
    return index, rank - (cumulative[index - 1] if index > 0 else 0)


class RadixSelect:
    """Exact k-th smallest values of a stream of float32 values, in two passes.

    ``add_high`` over every value, then ``finish_high(ranks)``; ``add_low`` over every
    value again, then ``values()``. Memory: one 65,536-bin histogram, plus one per rank,
    on the device of the values received (the histograms are made by counting them).
    """

    def __init__(self) -> None:
        self.high: torch.Tensor | None = None
        self.bins: list[int] = []
        self.rest: list[int] = []  # rank within the chosen high bin
        self.low: list[torch.Tensor | None] = []

    def add_high(self, values: torch.Tensor) -> None:
        for chunk in values.reshape(-1).split(_CHUNK):
            counts = torch.bincount(_sortable_keys(chunk) >> 16, minlength=_BINS)
            self.high = counts if self.high is None else self.high.add_(counts)

    def finish_high(self, ranks: Sequence[int]) -> None:
        cumulative = [] if self.high is None else _cumulative(self.high)
        total = cumulative[-1] if cumulative else 0
        for rank in ranks:
            if not 0 <= rank < total:
                raise ValueError(f"rank {rank} out of range for {total} values")
        for rank in ranks:
            index, rest = _rank_in(cumulative, rank)
            self.bins.append(index)
            self.rest.append(rest)
            self.low.append(None)

    def add_low(self, values: torch.Tensor) -> None:
        for chunk in values.reshape(-1).split(_CHUNK):
            keys = _sortable_keys(chunk)
            high = keys >> 16
            for j, bin_index in enumerate(self.bins):
                inside = keys[high == bin_index]
                if inside.numel():
                    counts = torch.bincount(inside & 0xFFFF, minlength=_BINS)
                    low = self.low[j]
                    self.low[j] = counts if low is None else low.add_(counts)

    def values(self) -> list[float]:
        out = []
        for bin_index, rest, low in zip(self.bins, self.rest, self.low, strict=True):
            if low is None:
                raise ValueError("add_low saw no value of a selected bin: not the same stream")
            index, _ = _rank_in(_cumulative(low), rest)
            out.append(_key_to_float((bin_index << 16) | index))
        return out


def whole_model_stats(
    tensors: TensorStream,
    densities: Sequence[float],
    options: PCBOptions,
    *,
    progress: bool = True,
    n_tensors: int | None = None,
) -> list[ModelStats | None]:
    """Per model, the whole-model statistics of the spec; None for an all-zero model.

    ``tensors()`` must yield the same tensors, in the same order, on every call,
    on the device and in the dtype the merge itself will see; tensors that are not
    floating point (buffers) are passed over. ``n_tensors``: how many it yields, for
    the progress bars.
    """
    n = len(densities)
    clamp = options.clamp_ratio > 0

    def stream(desc: str):
        for name, base, finetuned in tqdm(
            tensors(),
            desc=f"PCB whole-model statistics, {desc}",
            total=n_tensors,
            disable=not progress,
            unit="tensor",
            leave=False,
        ):
            if base.is_floating_point() and all(t.is_floating_point() for t in finetuned):
                yield name, base, finetuned

    def magnitudes(desc: str, check: bool = False):
        for name, base, finetuned in stream(desc):
            base = base.to(torch.float32)  # once per tensor, as the merge does
            if len(finetuned) != n:
                raise ValueError(f"expected {n} fine-tuned tensors, got {len(finetuned)}")
            if check and not torch.isfinite(base.sum(dtype=torch.float32)):
                raise NonFiniteInputError(f"base tensor {name} has NaN or Inf values", None, name)
            for i, tensor in enumerate(finetuned):
                magnitude = task_vector(base, tensor).abs_()
                if check and not torch.isfinite(magnitude.sum()):
                    raise NonFiniteInputError(
                        f"tensor {name} of model {i} has NaN or Inf values", i, name
                    )
                yield i, magnitude

    # Pass 1: size, min/max of |t| per model, and the high histograms of |t|.
    total = 0
    minimum, maximum = [float("inf")] * n, [0.0] * n
    selects = [RadixSelect() for _ in range(n)]
    for i, magnitude in magnitudes("pass 1/4 (|t|)", check=True):
        if magnitude.numel() == 0:
            continue
        total += magnitude.numel() if i == 0 else 0
        low, high = magnitude.aminmax()
        minimum[i], maximum[i] = min(minimum[i], float(low)), max(maximum[i], float(high))
        if clamp:
            selects[i].add_high(magnitude)
    if total == 0:
        return [None] * n
    nonzero = [m > 0 for m in maximum]

    # Pass 2: the exact clamp quantiles of |t| (the reference's sorted indices).
    if clamp:
        ranks = clamp_indices(total, options.clamp_ratio)
        for select in selects:
            select.finish_high(ranks)
        for i, magnitude in magnitudes("pass 2/4 (|t|)"):
            selects[i].add_low(magnitude)
        bounds = [tuple(select.values()) for select in selects]
    else:
        bounds = list(zip(minimum, maximum, strict=True))

    # Passes 3-4: the score with those bounds; its maximum and (1 - density) quantile.
    def scores(desc: str):
        for _name, base, finetuned in stream(desc):
            if base.numel() == 0:
                continue
            base = base.to(torch.float32)
            colsum = column_sum(base, finetuned, options)
            for i, tensor in enumerate(finetuned):
                if nonzero[i]:
                    lo, hi = bounds[i]
                    _, score = balance(task_vector(base, tensor), lo, hi, colsum, n, options)
                    yield i, score

    score_selects = [RadixSelect() for _ in range(n)]
    top = [float("-inf")] * n
    for i, score in scores("pass 3/4 (score)"):
        score_selects[i].add_high(score)
        top[i] = max(top[i], float(score.max()))
    for i in range(n):
        if nonzero[i]:
            score_selects[i].finish_high([drop_index(total, densities[i])])
    for i, score in scores("pass 4/4 (score)"):
        score_selects[i].add_low(score)

    stats: list[ModelStats | None] = []
    for i in range(n):
        if not nonzero[i]:
            stats.append(None)
            continue
        (threshold,) = score_selects[i].values()
        lo, hi = bounds[i]
        stats.append(ModelStats(clamp_lo=lo, clamp_hi=hi, threshold=threshold, top=top[i]))
    LOG.info("whole-model PCB statistics over %d entries per model: %s", total, stats)
    return stats
