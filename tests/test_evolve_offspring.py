"""Offspring of two individuals: the formula, its bounds, the mask rate, reproducible draws."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_pcb.evolve import offspring
from mergekit_pcb.evolve.offspring import OffspringKey, crossover_mask, mask_seed, mix


def _pair(dtype: torch.dtype, shape=(64, 33), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    parent = torch.randn(shape, generator=gen).to(dtype)
    partner = (parent.float() + torch.randn(shape, generator=gen)).to(dtype)
    return parent, partner


@pytest.mark.parametrize("cr", [0.1, 0.5, 0.9])
def test_the_mask_rate_is_cr(cr):
    n = 200_000
    mask = crossover_mask(n, cr, mask_seed(7, 0, 1, "t"))
    rate = mask.float().mean().item()
    # Binomial(n, cr): 5 standard deviations.
    assert abs(rate - cr) <= 5 * math.sqrt(cr * (1 - cr) / n)


def test_mask_extremes():
    assert not crossover_mask(1000, 0.0, 3).any()
    assert crossover_mask(1000, 1.0, 3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("f", [0.5, 0.3, 1.0])
def test_offspring_lies_between_parent_and_mutant(dtype, f):
    parent, partner = _pair(dtype)
    u = OffspringKey(1, 2, 0, 1, f=f, cr=0.5).tensor("w", parent, partner)
    assert u.dtype == dtype and u.shape == parent.shape
    # Entrywise between x_i and the mutant (1 - f) x_i + f x_r (float64), up to one
    # rounding to the storage dtype (float32 arithmetic rounds less than that).
    x_i, x_r = parent.double(), partner.double()
    mutant = (1 - f) * x_i + f * x_r
    slack = torch.finfo(dtype).eps * torch.maximum(x_i.abs(), x_r.abs())
    low = torch.minimum(x_i, mutant) - slack
    high = torch.maximum(x_i, mutant) + slack
    assert bool(((u.double() >= low) & (u.double() <= high)).all())
    # And it moved: about cr of the entries differ from the parent.
    moved = (u != parent).float().mean().item()
    assert 0.35 < moved < 0.55


def test_offspring_is_the_formula_on_the_mask():
    parent, partner = _pair(torch.float32)
    key = OffspringKey(5, 3, 2, 0, f=0.25, cr=0.4)
    u = key.tensor("layer.weight", parent, partner)
    mask = crossover_mask(parent.numel(), 0.4, mask_seed(5, 3, 2, "layer.weight"))
    mask = mask.view(parent.shape)
    # Independent computation in float64: x_i + m f (x_r - x_i), then rounded to float32.
    expected = parent.double() + mask.double() * 0.25 * (partner.double() - parent.double())
    assert torch.allclose(u.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(u[~mask], parent[~mask])  # outside the mask: the parent exactly
    assert 0.3 < mask.float().mean().item() < 0.5


def test_same_key_same_offspring_other_key_other_offspring():
    parent, partner = _pair(torch.bfloat16)
    key = OffspringKey(11, 4, 1, 2)
    first = key.tensor("a", parent, partner)
    assert torch.equal(first, OffspringKey(11, 4, 1, 2).tensor("a", parent, partner))
    for other in (
        OffspringKey(12, 4, 1, 2),  # seed
        OffspringKey(11, 5, 1, 2),  # generation
        OffspringKey(11, 4, 3, 2),  # individual
    ):
        assert not torch.equal(first, other.tensor("a", parent, partner))
    assert not torch.equal(first, key.tensor("b", parent, partner))  # tensor name


def test_mask_is_the_same_drawn_in_chunks(monkeypatch):
    parent, partner = _pair(torch.float32, shape=(1000, 37))
    whole = OffspringKey(2, 0, 0, 1).tensor("x", parent, partner)
    monkeypatch.setattr(offspring, "MASK_CHUNK", 1 << 10)
    assert torch.equal(whole, OffspringKey(2, 0, 0, 1).tensor("x", parent, partner))


def test_mix_in_place_and_buffers():
    parent, partner = _pair(torch.float32)
    expected = mix(parent, partner, 0.5, 0.5, 99)
    target = parent.clone()
    assert mix(target, partner, 0.5, 0.5, 99, out=target) is target
    assert torch.equal(target, expected)
    steps = torch.arange(10)
    assert torch.equal(mix(steps, steps + 5, 0.5, 0.5, 1), steps)  # not floating: kept
    with pytest.raises(ValueError, match="differ in shape"):
        mix(parent, partner[:3], 0.5, 0.5, 1)


def test_partner_is_another_individual_and_order_covers_all():
    for n in (2, 3, 7):
        seen = set()
        for g in range(100):
            order = offspring.generation_order(4, g, n)
            assert sorted(order) == list(range(n))
            for i in range(n):
                r = offspring.uniform_partner(4, g, i, n)
                assert r != i and 0 <= r < n
                seen.add((i, r))
        # Over 100 generations every ordered pair turns up (uniform among the others).
        assert len(seen) == n * (n - 1)
    orders = {tuple(offspring.generation_order(4, g, 5)) for g in range(30)}
    assert len(orders) > 10  # the order changes from generation to generation
    assert offspring.generation_order(4, 3, 5) == offspring.generation_order(4, 3, 5)


def test_uniform_draws_are_uniform():
    draws = [offspring.uniform(0, g, i) for g in range(100) for i in range(40)]
    assert all(0 <= d < 1 for d in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.02


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cr must be in"):
        OffspringKey(0, 0, 0, 1, cr=1.5)
    with pytest.raises(ValueError, match="f must be in"):
        OffspringKey(0, 0, 0, 1, f=-0.1)
    with pytest.raises(ValueError, match="own partner"):
        OffspringKey(0, 0, 1, 1)
    with pytest.raises(ValueError, match="seed must be"):
        offspring.uniform(-1, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parent_and_partner_are_left_unchanged(dtype):
    parent, partner = _pair(dtype)
    before = parent.clone(), partner.clone()
    OffspringKey(1, 0, 0, 1).tensor("w", parent, partner)
    assert torch.equal(parent, before[0]) and torch.equal(partner, before[1])


def test_masks_of_one_seed_nest_and_cr_is_resolved_to_16_bits():
    """One stream of 16-bit draws: a larger cr crosses a superset of the entries; rates
    closer than 2^-17 round to the same threshold (the documented resolution)."""
    seed, n = mask_seed(3, 1, 2, "w"), 50_000
    low, high = crossover_mask(n, 0.2, seed), crossover_mask(n, 0.7, seed)
    assert bool((low <= high).all()) and low.sum() < high.sum()
    assert torch.equal(crossover_mask(n, 0.5, seed), crossover_mask(n, 0.5 + 1e-6, seed))
    assert offspring.mask_threshold(0.5) == 32768
    assert offspring.mask_threshold(0.1) == 6554  # P(m = 1) = 0.10000610...
