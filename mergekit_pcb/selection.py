"""Exact order statistics of float32 values without sorting them.

Two selections, both exact (the element a full ascending sort puts at a rank):

* :func:`kth_smallest`, for one row in memory. Rows up to :func:`direct_limit` entries
  are selected whole (:func:`select_whole`, ``torch.topk``). Larger rows are located
  through a sorted random sample (:func:`sorted_sample`) in phases: values the sample
  repeats are tried as the answer by counting the entries below and through them
  (tie probes: rows full of ties are answered by counting alone); otherwise the
  sample brackets the rank, counting passes check the bracket, blocks of equal
  values at its edges are counted, and only the entries inside, a few percent of the
  row, are gathered and selected. A bracket the sample missed (checked) falls back to
  a whole-row selection. The comparison masks live in two bool buffers a caller may
  lend (:func:`selection_masks`), so the transient memory is that of the gathered
  entries.
* :class:`RadixSelect`, for values streamed in chunks (a whole model's tensors):
  two passes of 65,536-bin histograms over the float32 bit patterns.

Every buffer lives on the device of the values. Pure torch: this module knows
nothing of what the values are.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

#: Rows up to this size are selected whole: below it a whole-row ``topk`` costs less
#: than drawing a sample and counting (figures: ``benchmarks/kernel_speed.py``).
DIRECT_SELECT = 1 << 16

#: Per device type (``"cuda"``, ...), another size up to which rows are selected whole.
#: Empty: every device uses the sample. ``DIRECT_SELECT_ON["cuda"] = 1 << 62`` flips
#: CUDA to whole-row ``topk``.
DIRECT_SELECT_ON: dict[str, int] = {}

#: A bracket holding more than this many times its expected share of the row holds a
#: large block of equal values at an edge; the edges are then counted, not gathered.
_TIE_FACTOR = 2

#: Counting passes spent on values the sample repeats (two certify one) before the
#: bracket's entries are gathered.
_PROBE_COUNTS = 4


def direct_limit(device: torch.device) -> int:
    """Rows up to this many entries are selected whole on ``device``."""
    return DIRECT_SELECT_ON.get(device.type, DIRECT_SELECT)


def select_whole(values: torch.Tensor, index: int) -> torch.Tensor:
    """Element at ``index`` of flat ``values`` sorted ascending, by a whole-set selection.

    ``torch.topk`` of the smaller side, unsorted, on every device: on the CPU it is
    as fast as ``kthvalue`` or faster on the sets a bracket leaves, and on CUDA
    ``kthvalue`` runs one thread block per row. The smaller side keeps topk's output
    small.
    """
    d = values.numel()
    if index < d - index:
        return torch.topk(values, index + 1, largest=False, sorted=False).values.amax()
    return torch.topk(values, d - index, largest=True, sorted=False).values.amin()


def nonzero_count(x: torch.Tensor) -> torch.Tensor:
    """Count of nonzero entries of float32 ``x``, which must hold no ``-0.0``.

    Counted on the bit patterns: torch's float ``count_nonzero`` branches per entry,
    its integer one does not (several times faster on rows with scattered zeros).
    ``-0.0`` has a nonzero pattern, hence the condition.
    """
    return torch.count_nonzero(x.view(torch.int32))


def selection_masks(
    numel: int, device: torch.device | str, spare: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bool work buffers of ``numel`` entries for :func:`kth_smallest`.

    Views of ``spare`` (a float32 buffer of ``numel`` entries that is free during the
    selection: its 4 bytes per entry hold both) when given, else fresh.
    """
    if spare is not None:
        bools = spare.view(torch.bool)
        return bools[:numel], bools[numel : 2 * numel]
    return (
        torch.empty(numel, dtype=torch.bool, device=device),
        torch.empty(numel, dtype=torch.bool, device=device),
    )


# --- the sample --------------------------------------------------------------------


def _sample_size(numel: int) -> int:
    # Small samples cost less to draw and sort; on very large rows a larger one
    # narrows the bracket enough to pay for itself.
    return 1 << 12 if numel < 1 << 22 else 1 << 15


def sorted_sample(row: torch.Tensor) -> list[float]:
    """A sorted random sample of flat ``row`` (fixed seed: reproducible), on the host."""
    d = row.numel()
    generator = torch.Generator(device=row.device).manual_seed(d)
    picks = torch.randint(d, (_sample_size(d),), generator=generator, device=row.device)
    # To the host once: the bracket and probe logic is host arithmetic.
    return row.index_select(0, picks).sort().values.tolist()


def _repeated(sample: list[float], value: float) -> bool:
    return bisect.bisect_right(sample, value) - bisect.bisect_left(sample, value) >= 2


def _tie_candidate(sample: list[float], position: float) -> float | None:
    """The sample's value at ``position`` if the sample holds it twice or more, else None.

    A value the sample repeats holds a block of the row (about 1/len(sample) of it or
    more): the wanted rank likely falls in that block.
    """
    if not 0 <= position < len(sample):
        return None
    value = sample[int(position)]
    return value if _repeated(sample, value) else None


def likely_tie(sample: list[float], index: int, numel: int) -> float | None:
    """The value the sample repeats where rank ``index`` of ``numel`` falls, if any.

    A caller that can test such a value more cheaply than :func:`kth_smallest`
    (with counts it makes anyway) tries it first and hands a miss on as ``known``.
    """
    return _tie_candidate(sample, index / numel * len(sample))


def _position_after_miss(
    sample: list[float], value: float, count: int, index: int, numel: int
) -> float:
    """Where rank ``index`` falls in the sample, given ``count`` entries below ``value``'s
    block (if ``index < count``) or up to its end (otherwise): the sample only has to
    span the short distance from that block's edge to the rank.
    """
    m = len(sample)
    if index < count:
        return bisect.bisect_left(sample, value) - 1 - (count - 1 - index) * m / numel
    return bisect.bisect_right(sample, value) + (index - count) * m / numel


# --- the bracket and the comparison masks ------------------------------------------


def _float32_step(value: float, up: bool) -> float:
    """The float32 neighbour of float32 ``value`` above (``up``) or below it."""
    here = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(here, torch.tensor(math.inf if up else -math.inf)))


@dataclass
class _Bracket:
    """Inclusive float32 bounds on the order statistic of rank ``index``, with counts.

    ``below`` entries of the row lie under ``low``, ``through`` at or under ``high``;
    a bound of None is open (``below = 0``, ``through = numel``).
    """

    index: int
    low: float | None
    below: int
    high: float | None
    through: int

    def learn(self, value: float, count: int, inclusive: bool) -> None:
        """Narrow by ``count``, the entries ``< value`` (``<= value`` if ``inclusive``)."""
        if self.index < count:  # the answer is under value (at most value if inclusive)
            bound = value if inclusive else _float32_step(value, up=False)
            if self.high is None or bound < self.high:
                self.high, self.through = bound, count
        else:  # the answer is at least value (over it if inclusive)
            bound = _float32_step(value, up=True) if inclusive else value
            if self.low is None or bound > self.low:
                self.low, self.below = bound, count

    def holds(self, value: float) -> bool:
        return (self.low is None or self.low <= value) and (self.high is None or value <= self.high)

    @property
    def answer(self) -> float | None:
        """The order statistic, once both bounds meet."""
        return self.low if self.low is not None and self.low == self.high else None


_Compare = Callable[..., torch.Tensor]


class _Comparisons:
    """The two bool buffers of a selection, and the comparison of the row each holds.

    Buffer 0 serves the bracket's lower bound, buffer 1 its upper one. A phase that
    needs a comparison an earlier phase left in a buffer (or its complement) reuses
    it: one pass over the row saved.
    """

    def __init__(self, row: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]):
        self.row = row
        self.buffers = buffers
        self.held: list[tuple[_Compare, float] | None] = [None, None]

    def count(self, slot: int, compare: _Compare, value: float) -> torch.Tensor:
        """Entries with ``compare(row, value)``, into buffer ``slot`` (0: lower, 1: upper).

        The count stays on the row's device: callers stack counts, then read them
        in one host synchronisation.
        """
        compare(self.row, value, out=self.buffers[slot])
        self.held[slot] = (compare, value)
        return torch.count_nonzero(self.buffers[slot])

    def at_least(self, bound: float) -> torch.Tensor:
        """``row >= bound`` in the lower buffer."""
        mask = self.buffers[0]
        held = self.held[0]
        if held == (torch.ge, bound):
            return mask
        # A count of row < v or row <= v (an edge, or a probe that moved the bound)
        # leaves the complement of row >= v, or of row > v: row >= the step above v.
        complement = held == (torch.lt, bound) or (
            held is not None and held[0] is torch.le and _float32_step(held[1], up=True) == bound
        )
        if complement:
            self.held[0] = (torch.ge, bound)
            return mask.logical_not_()
        torch.ge(self.row, bound, out=mask)
        self.held[0] = (torch.ge, bound)
        return mask

    def at_most(self, bound: float) -> torch.Tensor:
        """``row <= bound`` in the upper buffer."""
        mask = self.buffers[1]
        held = self.held[1]
        if held == (torch.le, bound):
            return mask
        # row < v (an edge count) is row <= the float32 step below v.
        if held is not None and held[0] is torch.lt and _float32_step(held[1], up=False) == bound:
            self.held[1] = (torch.le, bound)
            return mask
        torch.le(self.row, bound, out=mask)
        self.held[1] = (torch.le, bound)
        return mask


# --- the selection of one row, phase by phase ---------------------------------------


class Counted(NamedTuple):
    """A value of the row already counted: ``below`` entries under it, ``through`` at
    or under it."""

    value: float
    below: int
    through: int


def kth_smallest(
    row: torch.Tensor,
    index: int,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    sample: list[float] | None = None,
    known: Counted | None = None,
) -> torch.Tensor:
    """Element at 0-based ``index`` of finite ``row`` sorted ascending, exactly, without a sort.

    ``masks``: two reusable bool buffers of the row's size (:func:`selection_masks`;
    fresh ones if None). ``sample``: the row's :func:`sorted_sample`, if the caller
    drew it already. ``known``: a value tried already, with its counts.
    Returns a 0-dim tensor of the row's dtype, on its device.
    """
    row = row.reshape(-1)
    d = row.numel()
    if d <= direct_limit(row.device):
        return select_whole(row, index)
    if sample is None:
        sample = sorted_sample(row)
    comparisons = _Comparisons(row, masks or selection_masks(d, row.device))
    bracket = _Bracket(index, None, 0, None, d)

    position = index / d * len(sample)  # the rank's estimated place in the sample
    if known is not None:
        position = _learn_known(bracket, sample, known, d)
    if bracket.answer is None:
        position = _probe_ties(comparisons, bracket, sample, position)
    if bracket.answer is not None:
        return _as_row_value(bracket.answer, row)

    expected = _close_with_sample(comparisons, bracket, sample, position)
    if expected is None or not bracket.below <= index < bracket.through:
        return select_whole(row, index)  # nothing to gain, or the sample missed the rank
    if bracket.answer is None:
        _count_tie_edges(comparisons, bracket, sample, expected)
    if bracket.answer is not None:
        return _as_row_value(bracket.answer, row)
    return select_whole(_gather(comparisons, bracket), index - bracket.below)


def _as_row_value(value: float, row: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=row.dtype, device=row.device)


def _learn_known(bracket: _Bracket, sample: list[float], known: Counted, numel: int) -> float:
    """Narrow by a value counted already; return where the rank falls in the sample."""
    value, below, through = known
    bracket.learn(value, below, inclusive=False)
    bracket.learn(value, through, inclusive=True)
    count = below if bracket.index < below else through
    return _position_after_miss(sample, value, count, bracket.index, numel)


def _probe_ties(
    comparisons: _Comparisons, bracket: _Bracket, sample: list[float], position: float
) -> float:
    """Tie probes: try values the sample repeats near the rank by counting.

    A candidate is the answer once the counts below it and through it bracket the
    rank; a count that rules it out places the rank exactly relative to its block,
    and the sample's value there is tried next. Returns the rank's estimated
    position in the sample, for the bracket.
    """
    numel = comparisons.row.numel()
    candidate = _tie_candidate(sample, position)
    for _ in range(_PROBE_COUNTS):
        if candidate is None or not bracket.holds(candidate):
            break
        # The edge of the candidate's block nearer the rank's estimated position is
        # the likelier to rule it out: that one is counted first.
        if bracket.low == candidate:
            inclusive = True
        elif bracket.high == candidate:
            inclusive = False
        else:
            start = bisect.bisect_left(sample, candidate)
            end = bisect.bisect_right(sample, candidate)
            inclusive = end - position < position - start
        compare = torch.le if inclusive else torch.lt
        count = int(comparisons.count(0, compare, candidate))
        bracket.learn(candidate, count, inclusive)
        if bracket.answer is not None:
            break
        if not bracket.holds(candidate):  # ruled out: on to where the count points
            position = _position_after_miss(sample, candidate, count, bracket.index, numel)
            candidate = _tie_candidate(sample, position)
    return position


def _close_with_sample(
    comparisons: _Comparisons, bracket: _Bracket, sample: list[float], position: float
) -> int | None:
    """Close the bracket's open sides with sample values a few standard deviations
    around ``position``, counted in one host synchronisation.

    Returns the entries the sample's window is expected to hold, or None when no
    side could be closed (a margin wider than the sample).
    """
    numel, m = comparisons.row.numel(), len(sample)
    q = bracket.index / numel
    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 16
    lo_rank, hi_rank = math.floor(position - spread), math.ceil(position + spread)
    new_low = sample[lo_rank] if bracket.low is None and lo_rank >= 0 else None
    new_high = sample[hi_rank] if bracket.high is None and hi_rank < m else None
    if bracket.low is None and bracket.high is None and new_low is None and new_high is None:
        return None
    counts = []
    if new_low is not None:
        counts.append(comparisons.count(0, torch.ge, new_low))
    if new_high is not None:
        counts.append(comparisons.count(1, torch.le, new_high))
    if counts:
        counted = torch.stack(counts).tolist()
        if new_low is not None:
            bracket.low, bracket.below = new_low, numel - counted[0]
        if new_high is not None:
            bracket.high, bracket.through = new_high, counted[-1]
    return (min(hi_rank, m - 1) - max(lo_rank, 0) + 1) * numel // m


def _count_tie_edges(
    comparisons: _Comparisons, bracket: _Bracket, sample: list[float], expected: int
) -> None:
    """Count blocks of equal values at the bracket's edges before anything is gathered.

    An edge value the sample repeats, or any edge of a bracket far fuller than its
    share, may hold a large block of ties: the rank may fall in it, and gathering it
    would select a large set. Counting ``<= low`` and ``< high`` either answers or
    moves the bounds past the blocks.
    """
    low, high = bracket.low, bracket.high
    overfull = bracket.through - bracket.below > _TIE_FACTOR * expected
    count_low = low is not None and (overfull or _repeated(sample, low))
    count_high = high is not None and (overfull or _repeated(sample, high))
    edges = []
    if count_low:
        edges.append(comparisons.count(0, torch.le, low))
    if count_high:
        edges.append(comparisons.count(1, torch.lt, high))
    if not edges:
        return
    counted = torch.stack(edges).tolist()
    if count_low:
        bracket.learn(low, counted[0], inclusive=True)
    if count_high and bracket.answer is None:
        bracket.learn(high, counted[-1], inclusive=False)


def _gather(comparisons: _Comparisons, bracket: _Bracket) -> torch.Tensor:
    """The row's entries inside the bracket (a small share of the row)."""
    lower = None if bracket.low is None else comparisons.at_least(bracket.low)
    upper = None if bracket.high is None else comparisons.at_most(bracket.high)
    if lower is None:
        inside = upper
    elif upper is None:
        inside = lower
    else:
        inside = lower.logical_and_(upper)
    return comparisons.row[inside]


# --- streamed selection: RadixSelect -------------------------------------------------

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
    value again, then ``values()``. The first pass histograms the upper 16 bits of
    the order-preserving bit patterns, which finds the bin holding each rank; the
    second histograms the lower 16 bits inside those bins, which finds the value.
    Memory: one 65,536-bin histogram, plus one per rank, on the device of the values
    received (the histograms are made by counting them).
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
