"""Exact whole-model PCB statistics in bounded memory (``scope: model``).

The reference takes its min-max normalisations and quantiles over the whole
flattened model. :func:`whole_model_stats` computes, per model, exactly those
statistics (:class:`mergekit_pcb.pcb.ModelStats`) by streaming over the tensors,
never holding more than one tensor's task vectors, in four passes:

* passes 1-2 select the outlier-clamp quantiles of ``|t|`` (step 1; its min and max
  when the clamp is off);
* passes 3-4 the (1 - density) quantile and the maximum of the score (steps 4-5),
  which needs the clamp bounds first.

The quantiles are exact, by streaming radix selection
(:class:`mergekit_pcb.selection.RadixSelect`); the scores come from the merge's own
``balance``, so they are bit for bit the ones the merge ranks. Every buffer lives on
the device of the tensors streamed (CUDA with ``--cuda``).

Pure tensor code: the caller supplies a function that iterates over
``(name, base, [finetuned...])`` for every tensor (``method_scope.py`` does it for
mergekit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from mergekit_pcb.pcb import (
    ModelStats,
    NonFiniteInputError,
    PCBOptions,
    balance,
    clamp_indices,
    column_sum,
    drop_index,
    task_vector,
)
from mergekit_pcb.selection import RadixSelect

LOG = logging.getLogger(__name__)

#: ``tensors()``: every tensor of the models as ``(name, base, [finetuned...])``.
TensorStream = Callable[[], Iterable[tuple[str, torch.Tensor, Sequence[torch.Tensor]]]]


def whole_model_stats(
    tensors: TensorStream,
    densities: Sequence[float],
    options: PCBOptions,
    *,
    progress: bool = True,
    n_tensors: int | None = None,
) -> list[ModelStats | None]:
    """Per model, its whole-model statistics; None for a model whose task vector is zero.

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
