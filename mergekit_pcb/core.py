"""PCB-Merging tensor math, free of mergekit.

Implements the steps of ``shared/pcb-spec.md`` (Du et al., NeurIPS 2024, as in the
authors' released code) for one tensor: outlier clamp, intra- and inter-balancing,
drop and rescale, weighted mean. Everything is computed in float32 on the device the
inputs live on; callers cast the result back.

Memory: the task vectors are processed one model at a time, so the working set is a
handful of float32 buffers the size of ONE tensor, whatever the number of models
(the naive form holds several n x d matrices).

Selection: the quantiles are exact order statistics (the element at the reference's
sorted index), found without sorting. Above 2^16 entries a sorted random sample
brackets the wanted rank; counting passes over the row check the bracket and, for
rows full of ties (bf16 task vectors have a few hundred distinct magnitudes among
millions), answer directly when the rank falls in a block of equal values at the
bracket's edge; otherwise only the entries inside the bracket, a few percent of the
row, are gathered and selected (``torch.topk``). The two bool masks of those passes
share the inter-balance buffer, which is free while a quantile is selected; the
transient memory is that of the gathered entries.

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

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

#: Lower bound of the per-element sum of scales (step 6 of the spec).
SCALE_SUM_EPS = 1e-12


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


#: Rows up to this size are selected whole (``_select``); above it, through a sampled
#: bracket, whose few passes over the row cost less than a whole-row selection. On
#: 2 CPU cores, 16.7M entries of a bf16 task vector: 13-35 ms per quantile, where a
#: whole-row ``kthvalue`` took 240 ms and ``topk`` of 20% 600 ms. On an H100, 58.7M
#: entries (the issue's figures): ``topk`` of 20% 1.4 ms, a sort 3.2 ms, against a
#: few elementwise passes of roughly 0.1 ms each (estimated from memory bandwidth).
_DIRECT_SELECT = 1 << 16

#: Per device type (``"cuda"``, ...), a different size up to which rows are selected
#: whole. Empty: every device uses the bracket (measured on the CPU; chosen for CUDA
#: from the figures above, not yet measured). Setting a device type to a huge value,
#: e.g. ``_DIRECT_SELECT_ON["cuda"] = 1 << 62``, flips it to whole-row ``topk``.
_DIRECT_SELECT_ON: dict[str, int] = {}

#: A bracket holding more than this many times its expected share of the row holds a
#: large block of equal values at an edge; the edges are then counted, not selected.
_TIE_FACTOR = 2


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


def _kth_smallest(
    row: torch.Tensor, index: int, masks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Element at 0-based ``index`` of finite ``row`` sorted ascending, exactly, without a sort.

    A whole-row selection (``kthvalue``, ``topk``) costs far more than a few
    comparison passes, so rows above ``_DIRECT_SELECT`` entries (per device:
    ``_DIRECT_SELECT_ON``) go through a sorted
    random sample. It brackets the wanted rank between two sample values ``low`` and
    ``high`` with a few standard deviations of margin; two counting passes check
    that the rank lies in ``[low, high]`` (if not, rare, the whole row is selected).
    If ``low == high``, that is the answer. If the bracket holds about its expected
    share of the row, its entries are gathered and selected. If it holds far more,
    a large block of values equal to an edge fills it (bf16-derived rows have a few
    hundred distinct values among millions): two more counts tell whether the rank
    falls in the block at ``low`` or at ``high``, the answer, or strictly between
    them, a small set that is gathered and selected. ``masks``: two reusable bool
    buffers of the row's size (fresh ones if None).
    """
    row = row.reshape(-1)
    d = row.numel()
    if d <= _direct_limit(row.device):
        return _select(row, index)
    m = _sample_size(d)
    generator = torch.Generator(device=row.device).manual_seed(d)
    picks = torch.randint(d, (m,), generator=generator, device=row.device)
    sample = row[picks].sort().values
    q = index / d
    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 16
    lo_rank, hi_rank = math.floor(q * m - spread), math.ceil(q * m + spread)
    low = sample[lo_rank] if lo_rank >= 0 else None
    high = sample[hi_rank] if hi_rank < m else None
    if low is None and high is None:  # a margin wider than the sample: nothing to gain
        return _select(row, index)
    if masks is None:
        masks = _selection_masks(d, row.device)
    above_low, through_high = masks  # row >= low, row <= high

    # Both counts and low == high in one host synchronisation (on an accelerator).
    checks = []
    if low is not None:
        checks.append(torch.count_nonzero(torch.ge(row, low, out=above_low)))
    if high is not None:
        checks.append(torch.count_nonzero(torch.le(row, high, out=through_high)))
    if low is not None and high is not None:
        checks.append((low == high).to(torch.int64))
    checked = torch.stack(checks).tolist()
    below = d - checked[0] if low is not None else 0
    through = checked[1 if low is not None else 0] if high is not None else d
    if not below <= index < through:  # the sample missed the rank
        return _select(row, index)
    if low is not None and high is not None and checked[2]:
        return low

    expected = (min(hi_rank, m - 1) - max(lo_rank, 0) + 1) * d // m
    if through - below <= _TIE_FACTOR * expected:
        if low is None:
            inside = through_high
        elif high is None:
            inside = above_low
        else:
            inside = above_low.logical_and_(through_high)
        return _select(row[inside], index - below)

    # A block of values equal to an edge fills the bracket: is the rank inside it?
    between = None  # then: entries strictly inside the bracket
    through_low = below
    if low is not None:
        through_low = int(torch.count_nonzero(torch.le(row, low, out=masks[0])))
        if index < through_low:
            return low
        between = masks[0].logical_not_()
    if high is not None:
        below_high = int(torch.count_nonzero(torch.lt(row, high, out=masks[1])))
        if index >= below_high:
            return high
        between = masks[1] if between is None else between.logical_and_(masks[1])
    return _select(row[between], index - through_low)


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
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], options: PCBOptions
) -> torch.Tensor | None:
    """``sum_i t_i`` of the RAW task vectors (None when inter-balancing is off).

    Accumulated in float32 delta space, so that subtracting the base does not
    cancel catastrophically.
    """
    if not options.inter_balance:
        return None
    colsum = torch.zeros(base.numel(), dtype=torch.float32, device=base.device)
    scratch = torch.empty_like(colsum)
    for tensor in finetuned:
        colsum.add_(task_vector(base, tensor, out=scratch))
    return colsum


def clamp_bounds(
    magnitude: torch.Tensor,
    clamp_ratio: float,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor outlier-clamp bounds of ``|t|`` (its min and max when the clamp is off)."""
    d = magnitude.numel()
    if clamp_ratio <= 0:
        low, high = magnitude.aminmax()
        return low, high
    lo_index, hi_index = clamp_indices(d, clamp_ratio)
    return _kth_smallest(magnitude, lo_index, masks), _kth_smallest(magnitude, hi_index, masks)


def balance(
    t: torch.Tensor,
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    colsum: torch.Tensor | None,
    n: int,
    options: PCBOptions,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for one model: return ``(Tc, beta)``; ``t`` (raw) is consumed.

    ``lo``/``hi`` are the clamp bounds, per tensor or whole-model. ``Tc`` reuses
    ``t``'s buffer, ``beta`` one of the two ``workspace`` buffers (fresh ones if
    None). The whole-model statistics pass calls this too, so that its scores are
    bit-identical to the merge pass's.
    """
    magnitude_out, inter_out = workspace if workspace is not None else (None, None)
    magnitude = torch.abs(t, out=magnitude_out) if magnitude_out is not None else t.abs()
    if options.clamp_ratio > 0:
        magnitude.clamp_(min=lo, max=hi)
    # min/max of the clamped magnitudes: torch.clamp gives ``hi`` everywhere if lo > hi.
    low, high = (lo, hi) if lo <= hi else (hi, hi)

    # Step 3 (before t is overwritten): inter-balance from the raw task vectors.
    inter = None
    if colsum is not None:
        inter = (
            torch.mul(t, colsum, out=inter_out) if inter_out is not None else t.mul(colsum)
        ).tanh_()

    # Clamped task vector Tc = sign(t) * A, built in t's buffer (zeros stay zero).
    clamped = t.sign_().mul_(magnitude)

    # Step 2: intra-balance exp(n * minmax(A)^2), shifted by exp(-n) per row so that
    # it cannot overflow; the per-row factor cancels in step 5.
    if options.intra_balance:
        span = high - low
        score = magnitude.sub_(low)
        if span > 0:
            score.div_(span)
        else:
            score.zero_()
        score.square_().sub_(1.0).mul_(float(n)).exp_()
        if inter is not None:
            score.mul_(inter)
    elif inter is not None:
        score = inter
    else:
        score = magnitude.fill_(1.0)
    return clamped, score


def rescale(
    score: torch.Tensor, threshold: torch.Tensor | float, top: torch.Tensor | float
) -> torch.Tensor:
    """Step 5 in place: 0 at or below ``threshold``, ``(beta - g) / (top - g)`` above.

    If ``top <= threshold`` the entries equal to ``top`` get 1 (at least one kept).
    """
    if top > threshold:
        return score.clamp_(min=threshold).sub_(threshold).div_(top - threshold)
    return score.eq_(top).to(torch.float32)


def drop_threshold(
    score: torch.Tensor,
    density: float,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-tensor (1 - density) quantile of the score, by selection."""
    return _kth_smallest(score, drop_index(score.numel(), density), masks)


def balanced_rows(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    densities: Sequence[float],
    options: PCBOptions,
    stats: Sequence[ModelStats | None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(i, scale_i * Tc_i, scale_i)`` for every model that takes part.

    Both tensors are flat float32 of ``base.numel()`` elements, in work buffers that
    are reused for the next model: use them before asking for the next row. Steps
    1-5 of the spec; step 6 (the weighted mean) is left to the caller so that
    merging and the tuner share this code.

    Without ``stats`` the quantiles and min/max are per tensor and a model whose
    task vector is zero in this tensor is skipped. With ``stats`` (whole-model
    scope) they come from ``stats[i]``; a model is skipped only when its whole
    task vector is zero (``stats[i] is None``), as in the reference.
    """
    n = len(finetuned)
    if len(densities) != n:
        raise ValueError(f"got {len(densities)} densities for {n} models")
    if stats is not None and len(stats) != n:
        raise ValueError(f"got statistics for {len(stats)} models, expected {n}")
    if n == 0 or base.numel() == 0:
        return
    colsum = column_sum(base, finetuned, options)
    # The column sum is finite iff every input is (NaN and Inf propagate): one cheap
    # check instead of one per input. Without it, each task vector is checked.
    if colsum is not None and not torch.isfinite(colsum.sum()):
        raise NonFiniteInputError("an input tensor has NaN or Inf values")
    buffers = [
        torch.empty(base.numel(), dtype=torch.float32, device=base.device)
        for _ in range(3 if colsum is not None else 2)
    ]
    workspace = (buffers[1], buffers[2] if colsum is not None else None)
    masks = None
    if stats is None and base.numel() > _direct_limit(base.device):
        # With both balances on, the inter-balance buffer is free whenever a quantile
        # is selected: not yet written for the clamp bounds, already multiplied into
        # the score (the magnitude buffer) for the drop threshold. Its 4 bytes per
        # entry hold the two bool masks, 2 bytes per entry less at the peak.
        spare = buffers[2] if colsum is not None and options.intra_balance else None
        masks = _selection_masks(base.numel(), base.device, spare)
    for i in range(n):
        model_stats = stats[i] if stats is not None else None
        if stats is not None and model_stats is None:
            continue
        t = task_vector(base, finetuned[i], out=buffers[0])
        if colsum is None and not torch.isfinite(t.sum()):
            raise NonFiniteInputError(f"input tensor {i} or the base has NaN or Inf values")
        if model_stats is None:
            magnitude = torch.abs(t, out=buffers[1])
            lo, hi = clamp_bounds(magnitude, options.clamp_ratio, masks)
            if hi == 0 and magnitude.max() == 0:  # this model left the tensor unchanged
                continue
        else:
            lo, hi = model_stats.clamp_lo, model_stats.clamp_hi
        clamped, score = balance(t, lo, hi, colsum, n, options, workspace)
        if model_stats is None:
            threshold, top = drop_threshold(score, densities[i], masks), score.max()
        else:
            threshold, top = model_stats.threshold, model_stats.top
        scale = rescale(score, threshold, top)
        yield i, clamped.mul_(scale), scale


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
    # float32 once: mixed-dtype arithmetic (float32 with bfloat16) is several times slower.
    base32 = base.reshape(-1).to(torch.float32)
    numerator = scale_sum = None
    for i, weighted, scale in balanced_rows(base32, finetuned, densities, options, stats):
        if numerator is None:
            numerator, scale_sum = torch.zeros_like(weighted), torch.zeros_like(scale)
        numerator.add_(weighted, alpha=float(weights[i]))
        scale_sum.add_(scale)
    if numerator is None:  # every task vector is zero
        return base.clone()
    merged = numerator.div_(scale_sum.clamp_(min=SCALE_SUM_EPS)).mul_(float(lam))
    merged = merged.add_(base32).reshape(base.shape)
    return merged.to(dtype=base.dtype)


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
    scale_sum = torch.zeros(base.numel(), dtype=torch.float32, device=base.device)
    base32 = base.reshape(-1).to(torch.float32)
    for i, weighted, scale in balanced_rows(base32, finetuned, densities, options, stats):
        contributions[i] = weighted
        scale_sum.add_(scale)
    contributions.div_(scale_sum.clamp_(min=SCALE_SUM_EPS))
    return contributions.reshape(n, *base.shape)
