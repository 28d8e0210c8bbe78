"""PCB-Merging of one tensor: the steps of docs/algorithm.md as tensor math (no mergekit).

| step | what                                | function                                       |
|------|-------------------------------------|------------------------------------------------|
| 1    | outlier clamp, ``Tc_i``             | ``tensor_clamp_bounds``, ``clamp_task_vector`` |
| 2    | intra-balancing                     | ``intra_balance``                              |
| 3    | inter-balancing                     | ``inter_balance``                              |
| 4    | score ``beta_i``                    | ``balance`` (steps 1-4 of a model)             |
| 5    | drop and rescale: ``scale_i``       | ``drop_ramp``, ``rescale``                     |
| 1-5  | every model, one after the other    | ``balanced_rows``                              |
| 6    | weighted mean of ``scale_i * Tc_i`` | ``pcb_merge`` (``_add_to_mean``)               |
| 7    | ``base + lambda * mean``            | ``pcb_merge`` (``_base_plus``)                 |

``pcb_contributions`` and ``undivided_contributions`` give the merge as a sum linear in
the per-model weights, for the tuner. Everything is computed in float32 on the
device the inputs live on; the merge comes back in the input dtype.

Steps 1-5 give every model's scores and scales bit for bit as the plain chain of
operations written in the step order would (the score decides which entries are
kept: a score rounded differently can swap two entries an ulp apart at the
threshold); only step 6's sums round otherwise. The models are processed one at a
time, so the working memory is a few float32 buffers the size of ONE tensor whatever
the number of models (``mergekit_pcb.work_buffers``); quantiles are exact order
statistics (``mergekit_pcb.selection``). Where the reference divides 0 by 0 the
result is defined here and finite (docs/algorithm.md, "Defined cases").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from mergekit_pcb.selection import (
    Counted,
    direct_limit,
    kth_smallest,
    likely_tie,
    nonzero_count,
    selection_masks,
    sorted_sample,
)
from mergekit_pcb.work_buffers import flat_float32, work_buffers

#: Lower bound of the per-entry sum of scales (step 6).
SCALE_SUM_EPS = 1e-12


# --- settings, inputs and whole-model statistics -------------------------------------


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


@dataclass(frozen=True)
class ModelStats:
    """One model's statistics over the WHOLE model, for ``scope: model``.

    ``clamp_lo``/``clamp_hi`` are the outlier-clamp quantiles of ``|t|`` (its min and
    max when the clamp is off), ``threshold`` the (1 - density) quantile of the
    score and ``top`` its maximum, all over every tensor of the model
    (``mergekit_pcb.model_stats`` computes them).
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
    ``scratch`` (a buffer of ``base.numel()`` entries, fresh if None) and is still
    there for a caller that processes that model next. ``out``: the result's buffer
    (fresh if None).
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


def quantile_index(numel: int, fraction: float) -> int:
    """``int(numel * fraction)``, the reference's quantile index, kept inside the row."""
    return min(max(int(numel * fraction), 0), numel - 1)


# --- step 1: outlier clamp ------------------------------------------------------------


def clamp_indices(numel: int, clamp_ratio: float) -> tuple[int, int]:
    """Sorted indices of the outlier-clamp bounds of ``|t|`` over ``numel`` entries.

    The lower bound is at ``int(numel * c)``; the upper one at ``int(numel * (1 - c)) - 1``,
    which the reference indexes Python-style, so ``-1`` (tiny rows) means the last.
    """
    hi_index = int(numel * (1.0 - clamp_ratio)) - 1
    return quantile_index(numel, clamp_ratio), numel - 1 if hi_index < 0 else hi_index


def tensor_clamp_bounds(
    t: torch.Tensor,
    clamp_ratio: float,
    magnitude_out: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float] | None:
    """Step 1's bounds of ``|t|`` over this tensor, as floats; None if ``t`` is all zero.

    Without a clamp they are the min and max of ``|t|`` (step 2 normalises by them).
    Counting the zeros answers every bound that falls among them (the sorted ``|t|``
    starts with its zeros; the lower bound of most fine-tunes is one) without a
    selection, and tells an unchanged tensor. ``magnitude_out`` receives ``|t|``;
    ``masks``: the selection's work buffers (see ``selection.kth_smallest``).
    """
    d = t.numel()
    magnitude = torch.abs(t, out=magnitude_out)  # no -0.0 left
    zeros = d - int(nonzero_count(magnitude))
    if zeros == d:
        return None
    if clamp_ratio <= 0:
        low, high = magnitude.aminmax()
        return float(low), float(high)
    return tuple(  # type: ignore[return-value]
        0.0 if index < zeros else float(kth_smallest(magnitude, index, masks))
        for index in clamp_indices(d, clamp_ratio)
    )


def clamp_task_vector(
    t: torch.Tensor, lo: float, hi: float, magnitude_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Step 1 in place: ``Tc = sign(t) * clamp(|t|, lo, hi)`` in ``t``'s buffer.

    Also returns, for step 2, the offset of the clamped magnitudes ``A`` from their
    minimum (in ``magnitude_out``, or ``+-A`` in ``Tc`` itself when that minimum is 0)
    and their span (max - min). Zeros stay zero.
    """
    # min and max of the clamped magnitudes: torch.clamp gives hi everywhere if lo > hi.
    low, high = (lo, hi) if lo <= hi else (hi, hi)
    if low == 0:
        # clamp(|t|, 0, high) with t's sign is clamp(t, -high, high): one pass. Its sign
        # squares away in step 2, so it serves as the offset too.
        clamped = t.clamp_(-high, high)
        return clamped, clamped, high - low
    magnitude = torch.abs(t, out=magnitude_out)
    magnitude.clamp_(min=lo, max=hi)
    clamped = t.sign_().mul_(magnitude)
    return clamped, magnitude.sub_(low), high - low


# --- step 2: intra-balancing ----------------------------------------------------------


def intra_balance(offset: torch.Tensor, span: float, n: int, out: torch.Tensor) -> torch.Tensor:
    """Step 2, ``exp(n * ((offset / span)^2 - 1))``, into ``out`` (which may be ``offset``).

    The reference's ``exp(n * minmax(A)^2)`` times ``exp(-n)``, a per-row factor that
    cancels in step 5 and keeps ``exp`` finite for any ``n``. The operations and their
    order are the plain chain's, rounding for rounding: torch's fused multiply-adds
    (e.g. ``addcmul``) round once where this rounds twice, and the score decides
    which entries are kept.
    """
    if span > 0:
        x = torch.div(offset, span, out=out)
    else:  # constant clamped magnitudes: exp(-n), a per-row constant
        x = out.zero_()
    return x.square_().sub_(1.0).mul_(float(n)).exp_()


# --- step 3: inter-balancing ----------------------------------------------------------

#: Below this magnitude float32 ``tanh(x)`` rounds to ``x``: ``x - x^3/3 < tanh(x) < x``
#: and ``x^3/3`` is under half a float32 unit of ``x`` for every ``|x| < 2^-12``.
_TANH_IDENTITY = 2.0**-12


def inter_balance(t: torch.Tensor, colsum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Step 3, ``tanh(t * colsum)`` of the RAW task vector, into ``out``.

    On the CPU ``tanh`` costs several elementwise passes, so it is skipped when every
    argument is below 2^-12 in magnitude, where float32 ``tanh`` is the identity
    (products of two task vectors usually are that small), if this torch build's
    ``tanh`` returns ``x`` there. An accelerator's ``tanh`` costs no more than the
    check, which would add a host synchronisation: it always runs there.
    """
    x = torch.mul(t, colsum, out=out)
    if x.device.type == "cpu" and x.numel() and _cpu_tanh_is_identity_below_threshold():
        low, high = x.aminmax()
        if max(-float(low), float(high)) < _TANH_IDENTITY:
            return x
    return x.tanh_()


@functools.cache
def _cpu_tanh_is_identity_below_threshold() -> bool:
    """Whether this torch build's CPU ``tanh`` returns ``x`` for ``|x| < 2^-12``.

    Correct rounding does, and so does torch's vectorised CPU ``tanh`` (all 2^30
    such floats checked on an AVX-512 build); a scalar libm ``tanhf`` may be an ulp
    off. Checked once, on a spread of values, signs, and an odd length (a scalar tail).
    """
    top = int(torch.tensor(_TANH_IDENTITY, dtype=torch.float32).view(torch.int32))
    bits = torch.cat([torch.arange(top - (1 << 23), top, 61), torch.arange(1, top, 100_003)]).to(
        torch.int32
    )
    x = bits.view(torch.float32)
    x = torch.cat([x, -x])[:-1]
    return bool(torch.equal(torch.tanh(x), x))


# --- step 4: the score ----------------------------------------------------------------


def balance(
    t: torch.Tensor,
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    colsum: torch.Tensor | None,
    n: int,
    options: PCBOptions,
    score_out: torch.Tensor | None = None,
    spare: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for one model: return ``(Tc, beta)``; ``t`` (raw) is consumed.

    ``lo``/``hi`` are the clamp bounds, per tensor or whole-model; ``colsum`` is None
    without inter-balancing. ``Tc`` reuses ``t``'s buffer, ``beta`` ``score_out``;
    ``spare`` is scratch (fresh buffers where None). The whole-model statistics call
    this too, so that their scores are bit for bit the merge's.
    """
    lo, hi = float(lo), float(hi)
    intra = options.intra_balance
    if score_out is None:
        score_out = torch.empty_like(t)
    if spare is None and colsum is not None:
        spare = torch.empty_like(score_out)

    # Step 3 first: it reads the raw task vector, which the clamp overwrites.
    inter = None
    if colsum is not None:
        inter = inter_balance(t, colsum, out=spare if intra else score_out)
    magnitude_out = score_out if intra or inter is None else spare
    clamped, offset, span = clamp_task_vector(t, lo, hi, magnitude_out)
    if intra:
        score = intra_balance(offset, span, n, out=score_out)
        if inter is not None:
            score.mul_(inter)
    elif inter is not None:
        score = inter
    else:
        score = score_out.fill_(1.0)
    return clamped, score


# --- step 5: drop and rescale ---------------------------------------------------------


def drop_index(numel: int, density: float) -> int:
    """Sorted index of the drop threshold: the ``(1 - density)`` quantile of the score."""
    return quantile_index(numel, 1.0 - density)


def _f32_difference(a: float, b: float) -> float:
    """``a - b`` for float32 values, rounded once to float32 (as a tensor op rounds it)."""
    return float(torch.tensor(a, dtype=torch.float32) - torch.tensor(b, dtype=torch.float32))


def _ramp(score: torch.Tensor, threshold: float, top: float) -> tuple[torch.Tensor, float]:
    """Step 5 in place as ``(ramp, span)``, ``scale = ramp / span``: ``ramp = max(beta - g, 0)``.

    ``(max(beta, g) - g) / (top - g)`` is ``max(beta - g, 0) / (top - g)``, in float32
    too. The division is left to the caller, where it can ride on another pass.
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


def drop_ramp(
    score: torch.Tensor,
    density: float,
    spare: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Per-tensor step 5 as ``_ramp``'s ``(ramp, span)``; ``ramp`` in ``spare`` or ``score``.

    The threshold ``g`` is the score's exact ``(1 - density)`` quantile. For tie-heavy
    scores the value the selection's sample repeats at the drop rank is tried first,
    by the ramp's own passes (the tie probe): ``score - g`` and its clamp at 0 have as
    many nonzeros as entries unequal to and above ``g``, which tells whether ``g`` is
    the order statistic, and the latter's maximum is ``top - g``. So a hit costs two
    counting reads beyond the ramp; a miss hands its counts to the selection. The
    result is the same either way, bit for bit.
    """
    d = score.numel()
    index = drop_index(d, density)
    sample = known = None
    if d > direct_limit(score.device):
        sample = sorted_sample(score)
        guess = likely_tie(sample, index, d)
        if guess:  # nonzero: then score - guess holds no -0.0, nor does its clamp at 0
            shifted = torch.sub(score, guess, out=spare)
            unequal = nonzero_count(shifted)
            span = shifted.clamp_(min=0.0).amax()
            above = nonzero_count(shifted)
            checked = torch.stack([unequal.double(), above.double(), span.double()]).tolist()
            below, through, span = int(checked[0] - checked[1]), d - int(checked[1]), checked[2]
            if below <= index < through:
                return (shifted, span) if span > 0 else (score.eq_(guess), 1.0)
            known = Counted(guess, below, through)
    threshold = kth_smallest(score, index, masks, sample=sample, known=known)
    return _ramp(score, float(threshold), float(score.max()))


# --- steps 1-5 for every model --------------------------------------------------------


@dataclass
class BalancedRow:
    """One model's steps 1-5, in work buffers the next row reuses.

    ``clamped`` is ``Tc_i``; the model's scale is ``ramp / span`` (``span`` a float, so
    that the division can ride on a later pass).
    """

    model: int
    clamped: torch.Tensor
    ramp: torch.Tensor
    span: float

    def scale(self) -> torch.Tensor:
        """``scale_i``, computed in the ramp's buffer."""
        return self.ramp.div_(self.span) if self.span != 1.0 else self.ramp


def balanced_rows(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    densities: Sequence[float],
    options: PCBOptions,
    stats: Sequence[ModelStats | None] | None = None,
) -> Iterator[BalancedRow]:
    """Steps 1-5 for every model that takes part, one :class:`BalancedRow` each.

    ``base`` is flat float32. The rows' tensors are flat float32 of ``base.numel()``
    entries in work buffers that the next row reuses: use a row before asking for
    the next (its ``clamped`` may be overwritten, e.g. by ``Tc_i * scale_i``).

    Without ``stats`` the quantiles and min/max are per tensor and a model whose task
    vector is zero in this tensor is skipped. With ``stats`` (whole-model scope) they
    come from ``stats[i]``; a model is skipped only when its whole task vector is
    zero (``stats[i] is None``), as in the reference.
    """
    n, d = len(finetuned), base.numel()
    if len(densities) != n:
        raise ValueError(f"got {len(densities)} densities for {n} models")
    if stats is not None and len(stats) != n:
        raise ValueError(f"got statistics for {len(stats)} models, expected {n}")
    if n == 0 or d == 0:
        return
    # The buffers: the task vector (then Tc in place), the score (|t| first, for the
    # clamp bounds), a spare (inter-balance, selection masks, a probed ramp) and, with
    # inter-balancing, the column sum.
    with work_buffers(4 if options.inter_balance else 3, d, base.device) as buffers:
        task, score_out, spare = buffers[:3]
        colsum = None
        if options.inter_balance:
            colsum = column_sum(base, finetuned, options, out=buffers[3], scratch=task)
            # The column sum is finite iff every input is (NaN and Inf propagate): one
            # check instead of one per input. Without it, each task vector is checked.
            if not torch.isfinite(colsum.sum()):
                raise NonFiniteInputError("an input tensor has NaN or Inf values")
        masks = None
        if stats is None and d > direct_limit(base.device):
            # The spare buffer is free whenever a quantile is selected: the inter-balance
            # is not yet written for the clamp bounds, already multiplied into the score
            # for the drop threshold.
            masks = selection_masks(d, base.device, spare)
        # The last model first: column_sum left its task vector in `task`.
        order = [n - 1, *range(n - 1)] if colsum is not None else range(n)
        for i in order:
            if stats is not None and stats[i] is None:  # its whole task vector is zero
                continue
            if i == n - 1 and colsum is not None:
                t = task
            else:
                t = task_vector(base, finetuned[i], out=task)
            if colsum is None and not torch.isfinite(t.sum()):
                raise NonFiniteInputError(f"input tensor {i} or the base has NaN or Inf values")
            model_stats = stats[i] if stats is not None else None
            if model_stats is None:
                bounds = tensor_clamp_bounds(t, options.clamp_ratio, score_out, masks)
                if bounds is None:  # this model left the tensor unchanged
                    continue
                lo, hi = bounds
            else:
                lo, hi = model_stats.clamp_lo, model_stats.clamp_hi
            clamped, score = balance(t, lo, hi, colsum, n, options, score_out, spare)
            if model_stats is None:
                ramp, span = drop_ramp(score, densities[i], spare, masks)
            else:
                ramp, span = _ramp(score, model_stats.threshold, model_stats.top)
            yield BalancedRow(i, clamped, ramp, span)


# --- steps 6 and 7: the merge ---------------------------------------------------------


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

    Returns a tensor of ``base``'s shape, dtype and device. ``stats``: whole-model
    statistics (``scope: model``), else every statistic is this tensor's.
    """
    options = options or PCBOptions()
    if len(weights) != len(finetuned):
        raise ValueError(f"got {len(weights)} weights for {len(finetuned)} models")
    with (
        flat_float32(base) as base32,
        work_buffers(2, base.numel(), base.device) as (numerator, scale_sum),
    ):
        first = True
        for row in balanced_rows(base32, finetuned, densities, options, stats):
            _add_to_mean(row, float(weights[row.model]), numerator, scale_sum, first)
            first = False
        if first:  # every task vector is zero
            return base.clone()
        return _base_plus(base, base32, numerator, scale_sum, lam)


def _add_to_mean(
    row: BalancedRow,
    weight: float,
    numerator: torch.Tensor,
    scale_sum: torch.Tensor,
    first: bool,
) -> None:
    """Step 6's sums: ``numerator += w_i s_i Tc_i``, ``scale_sum += s_i``, one pass each.

    ``s_i = ramp / span``: the division rides on the fused multiply-adds (a float32
    span below 2^-64 is divided out first: ``1 / span`` could overflow). The first
    row initialises the sums, which saves a zero-filling pass.
    """
    ramp, span = row.ramp, row.span
    if span < 2.0**-64:
        ramp, span = ramp.div_(span), 1.0
    if first:
        zero = torch.zeros((), dtype=torch.float32, device=ramp.device)
        torch.addcmul(zero, row.clamped, ramp, value=weight / span, out=numerator)
        torch.mul(ramp, 1.0 / span, out=scale_sum)
    else:
        numerator.addcmul_(row.clamped, ramp, value=weight / span)
        scale_sum.add_(ramp, alpha=1.0 / span)


def _base_plus(
    base: torch.Tensor,
    base32: torch.Tensor,
    numerator: torch.Tensor,
    scale_sum: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """Step 7 with step 6's division: ``base + lam * numerator / max(scale_sum, eps)``.

    One pass, into a fresh tensor of the input dtype (the result must not be a work
    buffer); ``scale_sum`` is clamped in place.
    """
    scale_sum.clamp_(min=SCALE_SUM_EPS)
    if base.dtype == torch.float32:
        result = torch.addcdiv(base32, numerator, scale_sum, value=float(lam))
    else:
        merged = torch.addcdiv(base32, numerator, scale_sum, value=float(lam), out=numerator)
        result = merged.to(base.dtype)
    return result.reshape(base.shape)


# --- the merge as a sum linear in the weights ----------------------------------------

Kept = TypeVar("Kept")


@dataclass(frozen=True)
class UndividedContributions(Generic[Kept]):
    """Each model's ``s_i * Tc_i`` as the caller keeps it, and the step-6 divisor.

    The contribution of model ``i`` is ``rows[i] / scale_sum``; models that take no
    part have no row. ``scale_sum`` is ``max(sum_i s_i, eps)``, flat float32.
    """

    rows: dict[int, Kept]
    scale_sum: torch.Tensor


def undivided_contributions(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    densities: Sequence[float],
    keep: Callable[[int, torch.Tensor], Kept],
    options: PCBOptions | None = None,
    stats: Sequence[ModelStats | None] | None = None,
) -> UndividedContributions[Kept]:
    """Steps 1-5 and step 6 without the weights, each model's row kept by ``keep``.

    ``keep(i, row)`` receives model ``i``'s flat float32 ``s_i * Tc_i`` in a work
    buffer that the next model overwrites, and returns what to keep of it (a copy,
    a compact form). The merge is ``base + lam * sum_i w_i rows[i] / scale_sum``.
    """
    options = options or PCBOptions()
    rows: dict[int, Kept] = {}
    scale_sum = torch.zeros(base.numel(), dtype=torch.float32, device=base.device)
    with flat_float32(base) as base32:
        for row in balanced_rows(base32, finetuned, densities, options, stats):
            scale = row.scale()
            rows[row.model] = keep(row.model, row.clamped.mul_(scale))
            scale_sum.add_(scale)
    return UndividedContributions(rows, scale_sum.clamp_(min=SCALE_SUM_EPS))


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
    n = len(finetuned)
    contributions = torch.zeros((n, base.numel()), dtype=torch.float32, device=base.device)
    undivided = undivided_contributions(
        base,
        finetuned,
        densities=densities,
        keep=lambda i, row: contributions[i].copy_(row),
        options=options,
        stats=stats,
    )
    contributions.div_(undivided.scale_sum)
    return contributions.reshape(n, *base.shape)
