"""A second PCB implementation, written from docs/algorithm.md for the tests only.

It follows that description literally (whole n x d matrix, full sorts, exp(n * minmax^2)
without the overflow shift, float64) and shares no code with ``mergekit_pcb``.
Only the undefined 0/0 cases are resolved the way the package documents them.
"""

from __future__ import annotations

import torch


def _q(rows: torch.Tensor, index: int) -> torch.Tensor:
    """Per-row element at ``index`` of the ascending sort (Python index semantics)."""
    return torch.sort(rows, dim=1).values[:, index].unsqueeze(1)


def _minmax(rows: torch.Tensor) -> torch.Tensor:
    low = rows.min(dim=1, keepdim=True).values
    high = rows.max(dim=1, keepdim=True).values
    span = high - low
    out = (rows - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out))


def reference_pcb(
    base: torch.Tensor,
    finetuned: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    lam: float = 1.0,
    clamp_ratio: float = 0.01,
    intra: bool = True,
    inter: bool = True,
) -> torch.Tensor:
    n = len(finetuned)
    d = base.numel()
    base64 = base.double().reshape(-1)
    tv = torch.stack([f.double().reshape(-1) - base64 for f in finetuned])  # n x d

    # 1. outlier clamp of |T| into [q(c), q'(c)]
    a = tv.abs()
    if clamp_ratio > 0:
        lo = _q(a, min(int(d * clamp_ratio), d - 1))
        hi = _q(a, int(d * (1 - clamp_ratio)) - 1)
        a = torch.clamp(a, lo, hi)
    tc = torch.sign(tv) * a

    # 2-4. score
    intra_b = torch.exp(n * _minmax(a) ** 2) if intra else torch.ones_like(a)
    inter_b = torch.tanh(tv * tv.sum(dim=0, keepdim=True)) if inter else torch.ones_like(a)
    beta = intra_b * inter_b

    # 5. drop and rescale, per row
    scales = []
    for i in range(n):
        if not torch.any(tv[i] != 0):
            scales.append(torch.zeros(d, dtype=torch.float64))
            continue
        row = beta[i : i + 1]
        g = _q(row, min(int(d * (1 - densities[i])), d - 1))
        top = row.max()
        if top > g:
            clamped = torch.clamp(row, min=g)
            scales.append(((clamped - g) / (top - g)).reshape(-1))
        else:
            scales.append((row == top).double().reshape(-1))
    scale = torch.stack(scales)

    # 6-7. weighted mean and global scale
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    tau = (w * scale * tc).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return (base64 + lam * tau).reshape(base.shape)


def relative_error(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """Max error relative to the largest merged task-vector entry.

    The float32 output cannot be closer than half a unit in the last place of
    ``base + tau`` (about 6e-8 for weights near 1, while task vectors may be
    ~1e-3), so that rounding is not counted as error.
    """
    exp32 = expected.float()
    half_ulp = (torch.nextafter(exp32.abs(), torch.tensor(float("inf"))) - exp32.abs()) / 2
    excess = ((got.double() - expected).abs() - half_ulp.double()).clamp(min=0)
    scale = (expected - base.double()).abs().max().clamp(min=1e-30)
    return (excess.max() / scale).item()
