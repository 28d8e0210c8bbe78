"""Exact selection (mergekit_pcb.selection): every selected value against a full sort.

Rows are checked at the ranks the PCB method selects at (the outlier-clamp indices
and the drop index for the densities of the released settings), on tie-heavy,
all-equal, two-valued and block rows; the streamed radix selection on chunked values.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mergekit_pcb import selection
from mergekit_pcb.pcb import clamp_indices, drop_index
from mergekit_pcb.selection import Counted, RadixSelect, kth_smallest, selection_masks
from tests.simulated_device import SimulatedDevice
from tests.tie_heavy import tie_heavy_models

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ranks(d: int) -> list[int]:
    """The sorted indices the method selects at, plus both ends."""
    ranks = {0, d - 1}
    for clamp_ratio in (0.01, 0.0001, 0.1):
        ranks.update(clamp_indices(d, clamp_ratio))
    for density in (0.05, 0.2, 0.5, 1.0):
        ranks.add(drop_index(d, density))
    return sorted(ranks)


def _bf16_task_vector(d: int, seed: int, *, ulps: float = 2.0, pm12: bool = False) -> torch.Tensor:
    """float32 ``finetuned - base`` of a bf16 fine-tune that moved each entry by a few ulps."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(d, generator=gen) * 0.02).to(torch.bfloat16)
    if pm12:  # every entry moved by 1 or 2 ulps: no zeros, a few dozen magnitudes
        sign = 2 * torch.randint(0, 2, (d,), generator=gen) - 1
        steps = torch.randint(1, 3, (d,), generator=gen) * sign
    else:  # round(N(0, ulps)): about a fifth unchanged
        steps = (torch.randn(d, generator=gen) * ulps).round().clamp(-8, 8)
    bits = base.view(torch.int16)
    moved = ((bits & 0x7FFF) + steps.to(torch.int16)).clamp(0, 0x7F7F)
    finetuned = ((bits & -0x8000) | moved).view(torch.bfloat16)
    return finetuned.float() - base.float()


def _block_row(d: int, seed: int, start: float, share: float) -> torch.Tensor:
    """Distinct values with a block of one repeated value over sorted ranks [start, start+share)."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.sort(torch.randn(d, generator=gen)).values
    lo, hi = int(d * start), int(d * (start + share))
    row[lo:hi] = row[lo]
    return row[torch.randperm(d, generator=gen)]


def _two_values(d: int, seed: int, share_low: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(d, generator=gen) < share_low, -0.5, 2.0)


ROWS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "bf16 |t|": lambda d, s: _bf16_task_vector(d, s).abs(),
    "bf16 |t| 1-2 ulps": lambda d, s: _bf16_task_vector(d, s, pm12=True).abs(),
    "bf16 t": lambda d, s: _bf16_task_vector(d, s),
    "bf16 score-like": lambda d, s: torch.tanh(
        _bf16_task_vector(d, s) * (_bf16_task_vector(d, s + 1) + _bf16_task_vector(d, s + 2)) * 1e7
    ),
    "all equal": lambda d, s: torch.full((d,), 0.37),
    "all zero": lambda d, s: torch.zeros(d),
    "two values 50/50": lambda d, s: _two_values(d, s, 0.5),
    "two values 80/20": lambda d, s: _two_values(d, s, 0.8),
    "two values 99/1": lambda d, s: _two_values(d, s, 0.99),
    # A block of equal values placed so that some of the method's ranks fall on its
    # first or last entry or just above it (the clamp and drop ranks are at 0.01%,
    # 1%, 10%, 50%, 80%, 90%, 95%, 99% of the row).
    "block at 0.19-0.8": lambda d, s: _block_row(d, s, 0.19, 0.61),
    "block at 0.2-0.5": lambda d, s: _block_row(d, s, 0.2, 0.3),
    "block at 0.5-0.8": lambda d, s: _block_row(d, s, 0.5, 0.3),
    "block at 0.8-0.99": lambda d, s: _block_row(d, s, 0.8, 0.19),
    "block at 0.01-0.95": lambda d, s: _block_row(d, s, 0.01, 0.94),
    "block at 0.799-0.801": lambda d, s: _block_row(d, s, 0.799, 0.002),
}


def _check_row(row: torch.Tensor) -> None:
    ordered = torch.sort(row).values
    for index in _ranks(row.numel()):
        got = kth_smallest(row, index).item()
        assert got == ordered[index].item(), f"rank {index}"
    # The same through the callers' reusable masks.
    masks = selection_masks(row.numel(), row.device)
    for index in _ranks(row.numel()):
        assert kth_smallest(row, index, masks).item() == ordered[index].item()


@pytest.mark.parametrize("kind", list(ROWS))
def test_tie_heavy_rows_match_a_full_sort(kind):
    _check_row(ROWS[kind](300_000, 5))


@pytest.mark.parametrize("kind", ["bf16 |t|", "bf16 |t| 1-2 ulps", "bf16 score-like"])
def test_tie_heavy_large_rows_match_a_full_sort(kind):
    # Above 2^22 entries the sample is larger (2^15).
    _check_row(ROWS[kind](4_300_000, 9))


@pytest.mark.parametrize("d", [10, 1000, 1 << 16])
@pytest.mark.parametrize("kind", ["bf16 |t|", "all equal", "two values 80/20"])
def test_small_rows_are_selected_directly_and_exactly(kind, d):
    _check_row(ROWS[kind](d, 3))


@pytest.mark.parametrize("kind", list(ROWS))
def test_tie_heavy_rows_never_select_a_large_set(kind, monkeypatch):
    # The point of the bracket: the whole-set selection (topk) only ever sees a
    # small share of the row (the bracket, at most ~2x its expected 7% here), never
    # a block of ties or the whole row, which made tie-heavy rows slow.
    d = 300_000
    sizes: list[int] = []
    real_select = selection.select_whole

    def spy(values: torch.Tensor, index: int) -> torch.Tensor:
        sizes.append(values.numel())
        return real_select(values, index)

    monkeypatch.setattr(selection, "select_whole", spy)
    row = ROWS[kind](d, 5)
    for index in _ranks(d):
        kth_smallest(row, index)
    assert max(sizes, default=0) <= 0.12 * d


def test_a_device_flipped_to_whole_row_selection_stays_exact(monkeypatch):
    monkeypatch.setitem(selection.DIRECT_SELECT_ON, "cpu", 1 << 62)
    selected: list[int] = []
    real_select = selection.select_whole
    monkeypatch.setattr(
        selection, "select_whole", lambda v, i: selected.append(v.numel()) or real_select(v, i)
    )
    row = ROWS["bf16 |t|"](200_000, 4)
    ordered = torch.sort(row).values
    for index in _ranks(row.numel()):
        assert kth_smallest(row, index).item() == ordered[index].item()
    assert set(selected) == {200_000}


@pytest.mark.parametrize(
    ("kind", "d"),
    [("normal", 400_000), ("ties", 400_000), ("signed-zeros", 400_000), ("normal", 4_200_000)],
)
def test_selection_on_large_rows_is_exact(kind, d):
    # Rows above 2^16 entries take the sampled-bracket path (a larger sample above 2^22).
    gen = torch.Generator().manual_seed(12)
    if kind == "normal":
        row = torch.randn(d, generator=gen)
    elif kind == "ties":
        row = torch.randint(0, 5, (d,), generator=gen).float()
    else:
        row = torch.randn(d, generator=gen).clamp(min=0) * torch.randint(0, 2, (d,), generator=gen)
    ordered = torch.sort(row).values
    for index in [0, 1, 4_000, 200_000, 320_000, d - 2, d - 1]:
        assert kth_smallest(row, index).item() == ordered[index].item()


def test_selection_falls_back_when_the_sample_misses(monkeypatch):
    row = torch.arange(300_000, dtype=torch.float32).flip(0)
    real_randint = torch.randint

    def only_the_top(high, size, **kwargs):  # a sample of the largest values only
        return real_randint(0, 100, size, **kwargs)

    monkeypatch.setattr(torch, "randint", only_the_top)
    assert kth_smallest(row, 150_000).item() == 150_000.0


def test_selection_with_a_value_already_counted():
    # A caller that tried a value (the drop threshold's tie probe) hands its counts on.
    _, (finetuned,) = tie_heavy_models(1, 300_000, seed=9)
    row = finetuned.float().abs()
    ordered = row.sort().values
    for index in (3_000, 150_000, 240_000, 277_000):
        for other in (index - 20_000, index - 300, index + 300, index + 20_000):
            value = ordered[other].item()
            known = Counted(value, int((row < value).sum()), int((row <= value).sum()))
            assert kth_smallest(row, index, known=known).item() == ordered[index].item()


def test_radix_select_is_exact():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(50_000, generator=gen),
            torch.tensor([0.0, -0.0, 0.0, 3.0, 3.0, -7.5, float(torch.finfo(torch.float32).tiny)]),
            torch.randn(1000, generator=gen).round(),  # many ties
        ]
    )
    chunks = values.split(7777)
    select = RadixSelect()
    for chunk in chunks:
        select.add_high(chunk)
    ranks = [0, 1, 500, 25_000, 50_003, len(values) - 2, len(values) - 1]
    select.finish_high(ranks)
    for chunk in chunks:
        select.add_low(chunk)
    expected = torch.sort(values).values
    assert select.values() == [expected[r].item() for r in ranks]
    with pytest.raises(ValueError, match="out of range"):
        RadixSelect().finish_high([0])


def test_the_simulated_device_catches_a_buffer_on_a_fixed_device():
    values = torch.rand(1000)
    with SimulatedDevice([values]) as device:
        histogram = torch.zeros(16, dtype=torch.int64)  # on the default device
        histogram += torch.bincount((values * 16).long(), minlength=16)
    assert device.mixed
    with SimulatedDevice([values]) as device:
        histogram = torch.zeros(16, dtype=torch.int64, device=values.device)
        histogram += torch.bincount((values * 16).long(), minlength=16)
        histogram = histogram.cpu() + torch.ones(16, dtype=torch.int64)  # moved off: fine
    assert not device.mixed


def test_radix_select_buffers_follow_their_input_device():
    values = torch.randn(30_000)
    with SimulatedDevice([values]) as device:
        select = RadixSelect()
        for chunk in values.split(7000):
            select.add_high(chunk)
        select.finish_high([0, 15_000, 29_999])
        for chunk in values.split(7000):
            select.add_low(chunk)
        got = select.values()
    assert not device.mixed, f"operations mixing devices: {device.mixed}"
    assert device.on_device(select.high) and all(device.on_device(h) for h in select.low)
    ordered = torch.sort(values).values
    assert got == [ordered[r].item() for r in (0, 15_000, 29_999)]


@CUDA
def test_selection_on_cuda_matches_a_full_sort():
    for kind in ("bf16 |t|", "bf16 |t| 1-2 ulps", "two values 80/20", "block at 0.2-0.5"):
        row = ROWS[kind](300_000, 5).cuda()
        ordered = torch.sort(row).values
        for index in _ranks(row.numel()):
            assert kth_smallest(row, index).item() == ordered[index].item(), (kind, index)


def test_nonzero_count_counts_on_bit_patterns_like_a_float_count():
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(100_001, generator=gen).clamp(min=0)  # about half +0.0
    row[::7] = float(torch.finfo(torch.float32).tiny) / 4  # subnormals are nonzero
    assert int(selection.nonzero_count(row)) == int((row != 0).sum())


def test_likely_tie_is_a_value_the_sample_repeats_at_the_rank():
    row = ROWS["two values 80/20"](300_000, 6)
    sample = selection.sorted_sample(row)
    assert sample == sorted(sample) and set(sample) <= {-0.5, 2.0}
    assert selection.sorted_sample(row) == sample  # fixed seed: the same sample
    assert selection.likely_tie(sample, 100_000, 300_000) == -0.5
    assert selection.likely_tie(sample, 290_000, 300_000) == 2.0
    distinct = torch.randn(300_000, generator=torch.Generator().manual_seed(6))
    assert selection.likely_tie(selection.sorted_sample(distinct), 150_000, 300_000) is None
