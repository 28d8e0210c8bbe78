"""Tie-heavy inputs like real bf16 fine-tunes, for the kernel tests."""

from __future__ import annotations

import torch


def tie_heavy_models(
    n: int, shape: int | tuple[int, ...], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and ``n`` fine-tunes a few bf16 ulps away from it.

    Each entry moves by ``round(N(0, 2))`` units in the last place, clipped to 8:
    task vectors hold a few hundred distinct magnitudes, about 20% of them zero.
    """
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    bits = base.view(torch.int16)
    finetuned = []
    for _ in range(n):
        steps = (torch.randn(shape, generator=gen) * 2).round().clamp(-8, 8).to(torch.int16)
        moved = ((bits & 0x7FFF) + steps).clamp(0, 0x7F7F)
        finetuned.append(((bits & -0x8000) | moved).view(torch.bfloat16))
    return base, finetuned
