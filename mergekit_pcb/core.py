"""PCB-Merging tensor math, free of mergekit.

Implements the steps of ``shared/pcb-spec.md`` (Du et al., NeurIPS 2024, as in the
authors' released code) for one tensor: outlier clamp, intra- and inter-balancing,
drop and rescale, weighted mean. Everything is computed in float32 on the device the
inputs live on; callers cast the result back.

How the steps are computed (whole-tensor torch operations, the same on every device).
Steps 1-5 give every model's scores and scales bit for bit as the plain chain of
operations written in the spec's order would (the score decides which entries are
kept: a score computed with other roundings can swap two entries an ulp apart at the
threshold); only the weighted mean of step 6 is summed with other roundings.

* the column sum ``sum_j t_j`` comes first, in model order; the last model's task
  vector, computed last there, is kept, and that model is processed first;
* step 3 before step 1, as the clamp overwrites the raw task vector:
  ``tanh(t_i * colsum)``. On the CPU, where ``tanh`` costs several passes, it is skipped
  when every argument is below 2^-12 in magnitude, where float32 ``tanh(x)`` is ``x``
  (products of two task vectors usually are that small), if this torch build's
  ``tanh`` returns ``x`` there (checked once);
* step 1: with a lower clamp bound of 0 (any tensor where more than the clamped share
  of entries is unchanged, e.g. bf16 fine-tunes) ``sign(t) * clamp(|t|, 0, hi)`` is
  ``clamp(t, -hi, hi)``, one pass; otherwise sign, magnitude and product as written;
* step 5: ``(max(beta, g) - g) / (top - g)`` as ``max(beta - g, 0) / (top - g)`` (equal
  in float32 too), ``top - g`` rounded to float32 on both scopes;
* step 6: ``sum_i w_i * scale_i * Tc_i`` and ``sum_i scale_i``, one fused multiply-add
  pass each per model, the division by ``top - g`` riding on them; the mean and
  ``base + lambda * mean`` in one pass.

Selection: the quantiles are exact order statistics (the element at the reference's
sorted index), found without sorting. The outlier-clamp bounds of ``|t|`` that fall
among its zeros (the lower one, for most fine-tunes) are 0, known from the count of
zeros that also tells an unchanged tensor. Above 2^16 entries a sorted random sample
locates the rank. Rows full of ties (bf16 task vectors have a few hundred distinct
magnitudes among millions, their scores a few thousand) are answered by counting
the entries below and through the sample's value there (for the drop threshold the
counts come from the rescale's own passes); otherwise the sample brackets the rank,
counting passes check the bracket, and only the entries inside, a few percent of the
row, are gathered and selected (``torch.topk``). The bool masks of those passes live
in a float32 work buffer that is free while a quantile is selected; the transient
memory is that of the gathered entries.

Memory: the task vectors are processed one model at a time, so the working set is a
handful of float32 buffers the size of ONE tensor, whatever the number of models
(the naive form holds several n x d matrices): the column sum, the task vector (then
its clamped form), the score, a spare (inter-balance, selection masks, the scales),
and for the merge the two running sums and a float32 copy of a half-precision base:
seven. On the CPU, buffers of up to ``_POOL_BUFFER_BYTES`` are taken from a
per-thread pool and returned to it after the call, which keeps up to ``_POOL_BYTES``
(512 MiB: the seven buffers of any tensor up to 2^24 entries) between calls: a fresh
buffer costs a page fault per 4 KiB page when first written, about three elementwise
passes over it. ``release_work_buffers`` empties the calling thread's pool. Other
devices allocate per call (CUDA's caching allocator already reuses memory).

Where the reference is undefined (0/0) the result is defined here, and finite:

* a model whose task vector is all zero in this tensor takes no part (its scale is 0);
  if every task vector is zero the merge returns the base exactly;
* if a row's drop threshold equals its maximum score (``density * numel < 1``, a
  1-element tensor, or ties), the entries holding the maximum score are kept with
  scale 1, like mergekit's TIES keeps at least one element;
* a constant clamped magnitude row (e.g. one element) has intra-balance ``exp(-n)``,
  a per-row constant, which cancels in the rescale.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Lower bound of the per-element sum of scales (step 6 of the spec).
SCALE_SUM_EPS = 1e-12

#: Below this magnitude float32 ``tanh(x)`` rounds to ``x``: ``x - x^3/3 < tanh(x) < x``
#: and ``x^3/3`` is under half a float32 unit of ``x`` for every ``|x| < 2^-12``.
_TANH_IDENTITY = 2.0**-12


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or Inf.

    ``model_index`` (None: the base or unknown) and ``tensor_name`` say where, when
    the raiser knows; otherwise the caller, which knows its inputs, finds out.
    """

    def __init__(
        self, message: str, model_index: int | None = None, tensor_name: str | None = None
    ):
        super().__init__(message)
        self.model_index = model_index
        self.tensor_name = tensor_name


@dataclass(frozen=True)
class PCBOptions:
    """Settings shared by every model of one merge (per-model ones are passed apart)."""

    clamp_ratio: float = 0.01
    intra_balance: bool = True
    inter_balance: bool = True

    def __post_init__(self) -> None:
        check_clamp_ratio(self.clamp_ratio)


def check_density(density: float) -> float:
    """Density is the fraction of entries KEPT per model: it must lie in (0, 1]."""
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise ValueError(f"pcb parameter 'density' must be in (0, 1], got {density!r}")
    return float(density)


def check_clamp_ratio(clamp_ratio: float) -> float:
    """The outlier clamp cuts this share at each end of |t|: it must lie in [0, 0.5)."""
    value = float(clamp_ratio)
    if not (value == value and 0.0 <= value < 0.5):  # value == value rejects NaN
        raise ValueError(
            f"pcb parameter 'clamp_ratio' must be finite and in [0, 0.5), got {clamp_ratio!r}"
        )
    return value


#: CPU work buffers each thread keeps between calls, in bytes; buffers larger than
#: ``_POOL_BUFFER_BYTES`` are allocated per call and never kept, so that a tensor's
#: seven buffers are kept together or not at all.
_POOL_BYTES = 512 << 20
_POOL_BUFFER_BYTES = _POOL_BYTES // 8


class _FreeBuffers(threading.local):
    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []


_FREE = _FreeBuffers()


def release_work_buffers() -> None:
    """Free the CPU work buffers the calling thread keeps for its next merge."""
    _FREE.buffers.clear()


@contextmanager
def _work_buffers(count: int, numel: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """``count`` flat float32 buffers of ``numel`` entries (contents undefined).

    On the CPU they come from, and go back to, the calling thread's pool (see the
    module notes); a kept buffer larger than ``numel`` serves through a view. Buffers
    in use are out of the pool, so nested or interleaved callers never share one.
    """
    if device.type != "cpu" or 4 * numel > _POOL_BUFFER_BYTES:
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
            if total + 4 * buffer.numel() <= _POOL_BYTES:
                kept.append(buffer)
                total += 4 * buffer.numel()
        free[:] = kept


#: Rows up to this size are selected whole (``_select``); above it, through a sample,
#: whose few passes over the row cost less than a whole-row selection. On 2 busy CPU
#: cores, 16.7M entries of a bf16 task vector: two to four counting passes of 15-20 ms
#: per quantile, where a whole-row ``kthvalue`` took 240 ms and ``topk`` of 20% 600 ms.
#: On an H100, 58.7M entries (the issue's figures): ``topk`` of 20% 1.4 ms, a sort
#: 3.2 ms, against elementwise passes of roughly 0.1 ms each (from memory bandwidth).
_DIRECT_SELECT = 1 << 16

#: Per device type (``"cuda"``, ...), a different size up to which rows are selected
#: whole. Empty: every device uses the bracket (measured on the CPU; chosen for CUDA
#: from the figures above, not yet measured). Setting a device type to a huge value,
#: e.g. ``_DIRECT_SELECT_ON["cuda"] = 1 << 62``, flips it to whole-row ``topk``.
_DIRECT_SELECT_ON: dict[str, int] = {}

#: A bracket holding more than this many times its expected share of the row holds a
#: large block of equal values at an edge; the edges are then counted, not selected.
_TIE_FACTOR = 2

#: Tie-heavy rows: counting passes spent on sample values tried as the answer (two
#: certify one) before the bracket's entries are gathered.
_PROBE_COUNTS = 4


def _direct_limit(device: torch.device) -> int:
    return _DIRECT_SELECT_ON.get(device.type, _DIRECT_SELECT)


def _sample_size(numel: int) -> int:
    # Small samples cost less to draw and sort; on very large rows a larger one
    # narrows the bracket enough to pay for itself (measured on 0.6M-25M rows).
    return 1 << 12 if numel < 1 << 22 else 1 << 15


def _select(values: torch.Tensor, index: int) -> torch.Tensor:
    """Element at ``index`` of flat ``values`` sorted ascending, by a whole-set selection.

    ``torch.topk`` of the smaller side, unsorted, on every device. On the CPU it
    is as fast as ``torch.kthvalue`` or faster on the sets the bracket leaves
    (medians on 2 busy cores: 65,536 entries 0.5-0.6 ms against 11 ms; 0.3-0.6M
    entries 10-19 ms against 9-27 ms); on CUDA ``kthvalue`` runs one thread block
    per row (420-460 ms on 58.7M entries on an H100). The smaller side keeps
    topk's output small.
    """
    d = values.numel()
    if index < d - index:
        return torch.topk(values, index + 1, largest=False, sorted=False).values.amax()
    return torch.topk(values, d - index, largest=True, sorted=False).values.amin()


def _selection_masks(
    numel: int, device: torch.device, spare: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bool work buffers of ``numel`` entries for ``_kth_smallest``.

    They are views of ``spare`` (a float32 buffer of ``numel`` entries that is free
    during selection) when given, else fresh.
    """
    if spare is not None:
        bools = spare.view(torch.bool)
        return bools[:numel], bools[numel : 2 * numel]
    return (
        torch.empty(numel, dtype=torch.bool, device=device),
        torch.empty(numel, dtype=torch.bool, device=device),
    )


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


def _sorted_sample(row: torch.Tensor) -> list[float]:
    """A sorted random sample of flat ``row`` (fixed seed: reproducible), on the host."""
    d = row.numel()
    generator = torch.Generator(device=row.device).manual_seed(d)
    picks = torch.randint(d, (_sample_size(d),), generator=generator, device=row.device)
    # To the host once: the bracket and probe logic below is host arithmetic.
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


def _count(row: torch.Tensor, value: float, inclusive: bool, mask: torch.Tensor) -> int:
    """Entries of ``row`` below ``value`` (at or below it if ``inclusive``)."""
    compare = torch.le if inclusive else torch.lt
    return int(torch.count_nonzero(compare(row, value, out=mask)))


def _kth_smallest(
    row: torch.Tensor,
    index: int,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    sample: list[float] | None = None,
    known: tuple[float, int, int] | None = None,
) -> torch.Tensor:
    """Element at 0-based ``index`` of finite ``row`` sorted ascending, exactly, without a sort.

    A whole-row selection (``kthvalue``, ``topk``) costs far more than a few
    comparison passes, so rows above ``_DIRECT_SELECT`` entries (per device:
    ``_DIRECT_SELECT_ON``) go through a sorted random sample (``sample``: drawn if
    None).

    Tie-heavy rows (bf16 task vectors have a few hundred distinct magnitudes among
    millions, their scores a few thousand) are answered by counting: if the sample
    repeats its value at the rank's position, that value is the answer iff the
    entries below it and through it bracket the rank, two counting passes, the edge
    nearer the rank counted first; a count that rules the value out places the rank
    exactly relative to its block, and the sample's value there is tried next
    (``_PROBE_COUNTS`` passes in all; ``known``: a value tried already, with its
    counts of entries below and through it).

    Otherwise, and after misses, the rank is bracketed by the values tried and by
    sample values a few standard deviations around its estimated position; counting
    passes check the bracket (if it missed, rare, the whole row is selected). Blocks
    of equal values at the bracket's edges (values the sample repeats, or a bracket
    far fuller than its share) are counted before anything is gathered; then the
    entries inside, a small share of the row, are gathered and selected. ``masks``:
    two reusable bool buffers of the row's size (fresh ones if None).
    """
    row = row.reshape(-1)
    d = row.numel()
    if d <= _direct_limit(row.device):
        return _select(row, index)
    if sample is None:
        sample = _sorted_sample(row)
    m = len(sample)
    if masks is None:
        masks = _selection_masks(d, row.device)

    def answer(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=row.dtype, device=row.device)

    bracket = _Bracket(index, None, 0, None, d)
    q = index / d
    position = q * m  # the rank's estimated place in the sample
    if known is not None:
        value, below, through = known
        bracket.learn(value, below, inclusive=False)
        bracket.learn(value, through, inclusive=True)
        if bracket.answer is not None:
            return answer(bracket.answer)
        position = _position_after_miss(
            sample, value, below if index < below else through, index, d
        )
    candidate = _tie_candidate(sample, position)
    for _ in range(_PROBE_COUNTS):
        if candidate is None or not bracket.holds(candidate):
            break
        # A candidate is the answer once the counts below it and through it bracket
        # the rank. The edge of its block nearer the rank's estimated position is the
        # likelier to rule it out: that one is counted first.
        if bracket.low == candidate:
            inclusive = True
        elif bracket.high == candidate:
            inclusive = False
        else:
            start, end = (
                bisect.bisect_left(sample, candidate),
                bisect.bisect_right(sample, candidate),
            )
            inclusive = end - position < position - start
        count = _count(row, candidate, inclusive, masks[0])
        bracket.learn(candidate, count, inclusive)
        if bracket.answer is not None:
            return answer(bracket.answer)
        if not bracket.holds(candidate):  # ruled out: on to where the count points
            position = _position_after_miss(sample, candidate, count, index, d)
            candidate = _tie_candidate(sample, position)

    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 16
    lo_rank, hi_rank = math.floor(position - spread), math.ceil(position + spread)
    # The sample's bracket closes the sides that no value tried has closed.
    new_low = sample[lo_rank] if bracket.low is None and lo_rank >= 0 else None
    new_high = sample[hi_rank] if bracket.high is None and hi_rank < m else None
    if bracket.low is None and bracket.high is None and new_low is None and new_high is None:
        return _select(row, index)  # a margin wider than the sample: nothing to gain
    above_low, through_high = masks  # row >= low, row <= high
    counts = []
    if new_low is not None:
        counts.append(torch.count_nonzero(torch.ge(row, new_low, out=above_low)))
    if new_high is not None:
        counts.append(torch.count_nonzero(torch.le(row, new_high, out=through_high)))
    if counts:  # both in one host synchronisation (on an accelerator)
        counted = torch.stack(counts).tolist()
        if new_low is not None:
            bracket.low, bracket.below = new_low, d - counted[0]
        if new_high is not None:
            bracket.high, bracket.through = new_high, counted[-1]
    low, below, high, through = bracket.low, bracket.below, bracket.high, bracket.through
    if not below <= index < through:  # the sample missed the rank
        return _select(row, index)
    if low is not None and low == high:
        return answer(low)

    # A block of equal values at an edge (a value the sample repeats, or a bracket far
    # fuller than its share) is counted before anything is gathered: the rank may fall
    # in it, and gathering it would select a large set.
    expected = (min(hi_rank, m - 1) - max(lo_rank, 0) + 1) * d // m
    overfull = through - below > _TIE_FACTOR * expected
    count_low = low is not None and (overfull or _repeated(sample, low))
    count_high = high is not None and (overfull or _repeated(sample, high))
    edges = []
    if count_low:
        edges.append(torch.count_nonzero(torch.le(row, low, out=masks[0])))
    if count_high:
        edges.append(torch.count_nonzero(torch.lt(row, high, out=masks[1])))
    if edges:
        counted = torch.stack(edges).tolist()
        if count_low:
            if index < counted[0]:
                return answer(low)
            below = counted[0]
        if count_high:
            if index >= counted[-1]:
                return answer(high)
            through = counted[-1]

    # Gather the entries strictly between counted edges, or from the bound on (masks
    # left by the bracket's counts are reused).
    lower = upper = None
    if low is not None:
        if count_low:
            lower = masks[0].logical_not_()  # row > low
        else:
            lower = above_low if new_low is not None else torch.ge(row, low, out=masks[0])
    if high is not None:
        if not count_high:  # masks[1] holds row < high otherwise
            if new_high is None:
                torch.le(row, high, out=masks[1])
        upper = masks[1]
    if lower is None:
        inside = upper
    elif upper is None:
        inside = lower
    else:
        inside = lower.logical_and_(upper)
    return _select(row[inside], index - below)


def quantile_index(numel: int, fraction: float) -> int:
    """``int(numel * fraction)``, the reference's quantile index, kept inside the row."""
    return min(max(int(numel * fraction), 0), numel - 1)


def clamp_indices(numel: int, clamp_ratio: float) -> tuple[int, int]:
    """Sorted indices of the outlier-clamp bounds of ``|t|`` over ``numel`` entries.

    The lower bound is at ``int(numel * c)``; the upper one at ``int(numel * (1 - c)) - 1``,
    which the reference indexes Python-style, so ``-1`` (tiny rows) means the last.
    """
    hi_index = int(numel * (1.0 - clamp_ratio)) - 1
    return quantile_index(numel, clamp_ratio), numel - 1 if hi_index < 0 else hi_index


def drop_index(numel: int, density: float) -> int:
    """Sorted index of the drop threshold: the ``(1 - density)`` quantile of the score."""
    return quantile_index(numel, 1.0 - density)


@dataclass(frozen=True)
class ModelStats:
    """One model's statistics over the WHOLE model, for ``scope: model``.

    ``clamp_lo``/``clamp_hi`` are the outlier-clamp quantiles of ``|t|`` (its min and
    max when the clamp is off), ``threshold`` the (1 - density) quantile of the
    score and ``top`` its maximum, all over every tensor of the model.
    """

    clamp_lo: float
    clamp_hi: float
    threshold: float
    top: float


def task_vector(
    base: torch.Tensor, finetuned: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat float32 ``finetuned - base``, in ``out`` or a fresh buffer (inputs untouched).

    The difference is taken in float32 whatever the input dtype.
    """
    if out is None:
        t = finetuned.reshape(-1).to(dtype=torch.float32, copy=True)
    else:
        t = out.copy_(finetuned.reshape(-1))
    return t.sub_(base.reshape(-1))


def column_sum(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    options: PCBOptions,
    *,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``sum_i t_i`` of the RAW task vectors (None when inter-balancing is off).

    Accumulated in float32 delta space, so that subtracting the base does not
    cancel catastrophically, in model order. The last task vector is computed into
    ``scratch`` (a work buffer of ``base.numel()`` entries, fresh if None) and is
    still there for a caller that processes that model next. ``out``: the result's
    buffer (fresh if None).
    """
    if not options.inter_balance:
        return None
    d = base.numel()
    colsum = out if out is not None else torch.empty(d, dtype=torch.float32, device=base.device)
    if not finetuned:
        return colsum.zero_()
    if scratch is None:
        scratch = torch.empty_like(colsum)
    if len(finetuned) == 1:
        return colsum.copy_(task_vector(base, finetuned[0], out=scratch))
    task_vector(base, finetuned[0], out=colsum)
    for tensor in finetuned[1:]:
        colsum.add_(task_vector(base, tensor, out=scratch))
    return colsum


def _tensor_clamp_bounds(
    t: torch.Tensor,
    clamp_ratio: float,
    magnitude_out: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[float, float] | None:
    """Per-tensor clamp bounds of ``|t|`` as floats; None if ``t`` is all zero.

    Counting the zeros answers every bound that falls among them (the sorted ``|t|``
    starts with its zeros) without a selection, and tells an unchanged tensor.
    ``magnitude_out`` receives ``|t|``.
    """
    d = t.numel()
    magnitude = torch.abs(t, out=magnitude_out)  # no -0.0 left
    zeros = d - int(_nonzeros(magnitude))
    if zeros == d:
        return None
    if clamp_ratio <= 0:
        low, high = magnitude.aminmax()
        return float(low), float(high)
    return tuple(  # type: ignore[return-value]
        0.0 if index < zeros else float(_kth_smallest(magnitude, index, masks))
        for index in clamp_indices(d, clamp_ratio)
    )


def _nonzeros(x: torch.Tensor) -> torch.Tensor:
    """Count of nonzero entries of float32 ``x``, which must hold no ``-0.0``.

    Counted on the bit patterns: torch's float ``count_nonzero`` branches per entry
    (40 ms on 16.7M entries with scattered zeros, on 2 CPU cores), its integer one
    does not (5 ms). ``-0.0`` has a nonzero pattern, hence the condition.
    """
    return torch.count_nonzero(x.view(torch.int32))


@functools.cache
def _cpu_tanh_is_identity_below_threshold() -> bool:
    """Whether this torch build's CPU ``tanh`` returns ``x`` for ``|x| < 2^-12``.

    Correct rounding does, and so does torch's vectorised CPU ``tanh`` (all 2^30
    such floats checked on an AVX-512 build); a scalar libm ``tanhf`` may be an ulp
    off. Checked on a spread of values, signs, and an odd length (a scalar tail).
    """
    top = int(torch.tensor(_TANH_IDENTITY, dtype=torch.float32).view(torch.int32))
    bits = torch.cat([torch.arange(top - (1 << 23), top, 61), torch.arange(1, top, 100_003)]).to(
        torch.int32
    )
    x = bits.view(torch.float32)
    x = torch.cat([x, -x])[:-1]
    return bool(torch.equal(torch.tanh(x), x))


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """``tanh`` in place; on the CPU skipped where it is the identity (``|x| < 2^-12``).

    The CPU's ``tanh`` costs about seven elementwise passes, the check one reduction.
    On an accelerator ``tanh`` costs no more than the check, which would add a host
    synchronisation, so it always runs there.
    """
    if x.device.type == "cpu" and x.numel() and _cpu_tanh_is_identity_below_threshold():
        low, high = x.aminmax()
        if max(-float(low), float(high)) < _TANH_IDENTITY:
            return x
    return x.tanh_()


def _intra_balance(offset: torch.Tensor, span: float, n: int, out: torch.Tensor) -> torch.Tensor:
    """Step 2, ``exp(n * ((offset / span)^2 - 1))``, into ``out`` (which may be ``offset``).

    ``offset`` is ``A - low``, or ``+-A`` when ``low = 0`` (the sign squares away
    exactly). The operations and their order are the reference chain's, rounding
    for rounding: the score decides which entries are kept, and two entries whose
    scores differ by an ulp swap places under any other rounding (torch's fused
    multiply-adds, e.g. ``addcmul``, round once where this rounds twice).
    """
    if span > 0:
        x = torch.div(offset, span, out=out)
    else:  # constant clamped magnitudes: exp(-n), a per-row constant
        x = out.zero_()
    return x.square_().sub_(1.0).mul_(float(n)).exp_()


def _balance(
    t: torch.Tensor,
    lo: float,
    hi: float,
    colsum: torch.Tensor | None,
    n: int,
    options: PCBOptions,
    score_out: torch.Tensor,
    spare: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 (see ``balance``); the score lands in ``score_out``, ``spare`` is scratch."""
    # min/max of the clamped magnitudes: torch.clamp gives ``hi`` everywhere if lo > hi.
    low, high = (lo, hi) if lo <= hi else (hi, hi)
    intra = options.intra_balance
    if spare is None and colsum is not None:
        spare = torch.empty_like(score_out)

    # Step 3 first: it takes the raw task vectors, which the clamp overwrites.
    inter = None
    if colsum is not None:
        inter = _tanh_(torch.mul(t, colsum, out=spare if intra else score_out))

    # Step 1: clamped task vector Tc = sign(t) * A in t's buffer (zeros stay zero).
    if low == 0:
        # clamp(|t|, 0, high) with t's sign is clamp(t, -high, high); its square is A^2.
        clamped = t.clamp_(-high, high)
        offset = clamped
    else:
        magnitude = torch.abs(t, out=score_out if intra or inter is None else spare)
        magnitude.clamp_(min=lo, max=hi)
        clamped = t.sign_().mul_(magnitude)
        offset = magnitude.sub_(low)

    # Step 2 (shifted by exp(-n), a per-row factor that cancels in step 5) and step 4.
    if intra:
        score = _intra_balance(offset, high - low, n, score_out)
        if inter is not None:
            score.mul_(inter)
    elif inter is not None:
        score = inter
    else:
        score = score_out.fill_(1.0)
    return clamped, score


def balance(
    t: torch.Tensor,
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    colsum: torch.Tensor | None,
    n: int,
    options: PCBOptions,
    workspace: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for one model: return ``(Tc, beta)``; ``t`` (raw) is consumed.

    ``lo``/``hi`` are the clamp bounds, per tensor or whole-model. ``Tc`` reuses
    ``t``'s buffer, ``beta`` the first of the two ``workspace`` buffers, the second is
    scratch (fresh ones if None; the second may be None without inter-balancing).
    The whole-model statistics pass calls this too, so that its scores are
    bit-identical to the merge pass's.
    """
    if workspace is None:
        workspace = (torch.empty_like(t), None)
    score_out, spare = workspace
    return _balance(t, float(lo), float(hi), colsum, n, options, score_out, spare)


def _f32_difference(a: float, b: float) -> float:
    """``a - b`` for float32 values, rounded once to float32 (as a tensor op rounds it)."""
    return float(torch.tensor(a, dtype=torch.float32) - torch.tensor(b, dtype=torch.float32))


def _ramp(score: torch.Tensor, threshold: float, top: float) -> tuple[torch.Tensor, float]:
    """Step 5 in place as ``(ramp, span)``, ``scale = ramp / span``: ``ramp = max(beta - g, 0)``.

    ``span = top - g`` is rounded to float32 whether the bounds come from whole-model
    statistics (floats) or from this tensor, so that both scopes scale alike. If
    ``top <= threshold`` the entries equal to ``top`` get 1 (at least one kept):
    ``ramp`` is that 0/1 mask and ``span`` is 1.
    """
    if top > threshold:
        return score.sub_(threshold).clamp_(min=0.0), _f32_difference(top, threshold)
    return score.eq_(top), 1.0


def rescale(
    score: torch.Tensor, threshold: torch.Tensor | float, top: torch.Tensor | float
) -> torch.Tensor:
    """Step 5 in place: 0 at or below ``threshold``, ``(beta - g) / (top - g)`` above.

    If ``top <= threshold`` the entries equal to ``top`` get 1 (at least one kept).
    """
    ramp, span = _ramp(score, float(threshold), float(top))
    return ramp.div_(span) if span != 1.0 else ramp


def _drop_ramp(
    score: torch.Tensor,
    density: float,
    spare: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, float]:
    """Per-tensor step 5 as ``_ramp``'s ``(ramp, span)``; ``ramp`` in ``spare`` or ``score``.

    For tie-heavy scores the sample's value at the drop rank (if the sample repeats
    it) is tried as the threshold ``g`` by the ramp's own passes: ``score - g`` and
    its clamp at 0 have as many nonzeros as entries unequal to and above ``g``,
    which tells whether ``g`` is the order statistic, and the latter's maximum is
    ``top - g``. So a hit costs two counting reads beyond the ramp; a miss hands
    its counts to the selection. The result is the same either way, bit for bit.
    """
    d = score.numel()
    index = drop_index(d, density)
    sample = known = None
    if d > _direct_limit(score.device):
        sample = _sorted_sample(score)
        guess = _tie_candidate(sample, index / d * len(sample))
        if guess:  # nonzero: then score - guess holds no -0.0, nor does its clamp at 0
            shifted = torch.sub(score, guess, out=spare)
            unequal = _nonzeros(shifted)
            span = shifted.clamp_(min=0.0).amax()
            above = _nonzeros(shifted)
            checked = torch.stack([unequal.double(), above.double(), span.double()]).tolist()
            below, through, span = int(checked[0] - checked[1]), d - int(checked[1]), checked[2]
            if below <= index < through:
                return (shifted, span) if span > 0 else (score.eq_(guess), 1.0)
            known = (guess, below, through)
    threshold = _kth_smallest(score, index, masks, sample=sample, known=known)
    return _ramp(score, float(threshold), float(score.max()))


def balanced_rows(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    densities: Sequence[float],
    options: PCBOptions,
    stats: Sequence[ModelStats | None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(i, Tc_i, scale_i)`` for every model that takes part.

    ``base`` is flat float32. Both yielded tensors are flat float32 of ``base.numel()``
    elements, in work buffers that are reused for the next model: use them before
    asking for the next row (``Tc_i`` may be overwritten, e.g. by ``Tc_i * scale_i``).
    Steps 1-5 of the spec; step 6 (the weighted mean) is left to the caller so that
    merging and the tuner share this code. With inter-balancing the last model comes
    first (its task vector is left over from the column sum), then the others in order.

    Without ``stats`` the quantiles and min/max are per tensor and a model whose
    task vector is zero in this tensor is skipped. With ``stats`` (whole-model
    scope) they come from ``stats[i]``; a model is skipped only when its whole
    task vector is zero (``stats[i] is None``), as in the reference.
    """
    for i, clamped, ramp, span in _ramped_rows(base, finetuned, densities, options, stats):
        yield i, clamped, ramp.div_(span) if span != 1.0 else ramp


def _ramped_rows(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    densities: Sequence[float],
    options: PCBOptions,
    stats: Sequence[ModelStats | None] | None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """``balanced_rows`` with each scale as ``(ramp, span)`` (see ``_ramp``)."""
    n = len(finetuned)
    if len(densities) != n:
        raise ValueError(f"got {len(densities)} densities for {n} models")
    if stats is not None and len(stats) != n:
        raise ValueError(f"got statistics for {len(stats)} models, expected {n}")
    if n == 0 or base.numel() == 0:
        return
    count = 4 if options.inter_balance else 3
    with _work_buffers(count, base.numel(), base.device) as buffers:
        yield from _rows(base, finetuned, densities, options, stats, buffers)


def _rows(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    densities: Sequence[float],
    options: PCBOptions,
    stats: Sequence[ModelStats | None] | None,
    buffers: list[torch.Tensor],
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """``_ramped_rows`` in the given work buffers: the task vector (then its clamped
    form), the score, a spare (inter-balance, selection masks, the ramp) and, with
    inter-balancing, the column sum."""
    n, d = len(finetuned), base.numel()
    t_buffer, score_buffer, spare = buffers[:3]
    colsum = None
    if options.inter_balance:
        colsum = column_sum(base, finetuned, options, out=buffers[3], scratch=t_buffer)
        # The column sum is finite iff every input is (NaN and Inf propagate): one
        # cheap check instead of one per input. Without it, each task vector is checked.
        if not torch.isfinite(colsum.sum()):
            raise NonFiniteInputError("an input tensor has NaN or Inf values")
    masks = None
    if stats is None and d > _direct_limit(base.device):
        # The spare buffer is free whenever a quantile is selected: the inter-balance
        # is not yet written for the clamp bounds, already multiplied into the score
        # for the drop threshold. Its 4 bytes per entry hold the two bool masks.
        masks = _selection_masks(d, base.device, spare)
    # The last model first: column_sum left its task vector in t_buffer.
    order = [n - 1, *range(n - 1)] if colsum is not None else range(n)
    for i in order:
        model_stats = stats[i] if stats is not None else None
        if stats is not None and model_stats is None:
            continue
        if i == n - 1 and colsum is not None:
            t = t_buffer
        else:
            t = task_vector(base, finetuned[i], out=t_buffer)
        if colsum is None and not torch.isfinite(t.sum()):
            raise NonFiniteInputError(f"input tensor {i} or the base has NaN or Inf values")
        if model_stats is None:
            bounds = _tensor_clamp_bounds(t, options.clamp_ratio, score_buffer, masks)
            if bounds is None:  # this model left the tensor unchanged
                continue
            lo, hi = bounds
        else:
            lo, hi = model_stats.clamp_lo, model_stats.clamp_hi
        clamped, score = _balance(t, lo, hi, colsum, n, options, score_buffer, spare)
        if model_stats is None:
            ramp, span = _drop_ramp(score, densities[i], spare, masks)
        else:
            ramp, span = _ramp(score, model_stats.threshold, model_stats.top)
        yield i, clamped, ramp, span


@contextmanager
def _flat_float32(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor`` flat in float32: itself if it is, else a copy in a work buffer.

    Converted once: mixed-dtype arithmetic (float32 with bfloat16) is several times
    slower than either alone.
    """
    flat = tensor.reshape(-1)
    if flat.dtype == torch.float32:
        yield flat
        return
    with _work_buffers(1, flat.numel(), flat.device) as (buffer,):
        yield buffer.copy_(flat)


def pcb_merge(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float = 1.0,
    options: PCBOptions | None = None,
    stats: Sequence[ModelStats | None] | None = None,
) -> torch.Tensor:
    """Merged tensor ``base + lam * sum_i(w_i s_i Tc_i) / max(sum_i s_i, eps)``.

    Returns a tensor of ``base``'s shape, dtype and device.
    """
    options = options or PCBOptions()
    if len(weights) != len(finetuned):
        raise ValueError(f"got {len(weights)} weights for {len(finetuned)} models")
    with (
        _flat_float32(base) as base32,
        _work_buffers(2, base.numel(), base.device) as (numerator, scale_sum),
    ):
        rows = _ramped_rows(base32, finetuned, densities, options, stats)
        started = False
        for i, clamped, ramp, span in rows:
            # scale_i = ramp / span: the division rides on the accumulating passes
            # (a float32 span below 2^-64 is divided out first: 1/span could overflow).
            if span < 2.0**-64:
                ramp, span = ramp.div_(span), 1.0
            weight = float(weights[i])
            if started:
                numerator.addcmul_(clamped, ramp, value=weight / span)
                scale_sum.add_(ramp, alpha=1.0 / span)
            else:  # the first row initialises the sums (no zero-filling pass)
                zero = torch.zeros((), dtype=torch.float32, device=base.device)
                torch.addcmul(zero, clamped, ramp, value=weight / span, out=numerator)
                torch.mul(ramp, 1.0 / span, out=scale_sum)
                started = True
        if not started:  # every task vector is zero
            return base.clone()
        # base + lam * numerator / max(scale_sum, eps) in one pass, into a fresh tensor
        # of the input dtype (the result must not be a work buffer).
        scale_sum.clamp_(min=SCALE_SUM_EPS)
        if base.dtype == torch.float32:
            result = torch.addcdiv(base32, numerator, scale_sum, value=float(lam))
        else:
            merged = torch.addcdiv(base32, numerator, scale_sum, value=float(lam), out=numerator)
            result = merged.to(base.dtype)
    return result.reshape(base.shape)


def pcb_contributions(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    densities: Sequence[float],
    options: PCBOptions | None = None,
    stats: Sequence[ModelStats | None] | None = None,
) -> torch.Tensor:
    """Per-model contributions ``c_i = s_i Tc_i / max(sum_j s_j, eps)``, float32 ``(n, *shape)``.

    The merge is linear in the per-model weights: ``base + lam * sum_i w_i c_i``.
    """
    options = options or PCBOptions()
    n = len(finetuned)
    contributions = torch.zeros((n, base.numel()), dtype=torch.float32, device=base.device)
    with (
        _flat_float32(base) as base32,
        _work_buffers(1, base.numel(), base.device) as (scale_sum,),
    ):
        scale_sum.zero_()
        for i, clamped, scale in balanced_rows(base32, finetuned, densities, options, stats):
            torch.mul(clamped, scale, out=contributions[i])
            scale_sum.add_(scale)
        contributions.div_(scale_sum.clamp_(min=SCALE_SUM_EPS))
    return contributions.reshape(n, *base.shape)
