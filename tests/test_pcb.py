"""The PCB steps of mergekit_pcb.pcb against docs/algorithm.md: by hand, by a second
implementation (tests/reference_pcb.py) and bit for bit against the plain chain of steps."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_pcb.pcb import (
    PCBOptions,
    balanced_rows,
    clamp_indices,
    drop_index,
    drop_ramp,
    pcb_contributions,
    pcb_merge,
    rescale,
    undivided_contributions,
)
from mergekit_pcb.selection import selection_masks
from tests.reference_pcb import reference_pcb, relative_error
from tests.tie_heavy import tie_heavy_models

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _random_models(n: int, shape: tuple[int, ...], seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    finetuned = [base + 0.02 * torch.randn(shape, generator=gen) for _ in range(n)]
    return base.to(dtype), [f.to(dtype) for f in finetuned]


CASES = [
    # n, shape, density, clamp_ratio, intra, inter
    (1, (64,), 0.2, 0.01, True, True),
    (2, (10, 30), 0.05, 0.01, True, True),
    (3, (40, 50), 0.2, 0.01, True, True),
    (3, (40, 50), 0.5, 0.0, True, True),
    (4, (33, 17), 1.0, 0.01, True, True),
    (5, (128, 8), 0.1, 0.1, True, True),
    (8, (1000,), 0.2, 0.0001, True, True),
    (3, (40, 50), 0.2, 0.01, False, True),
    (3, (40, 50), 0.2, 0.01, True, False),
    (3, (40, 50), 0.2, 0.01, False, False),
    (40, (200,), 0.3, 0.01, True, True),
]


@pytest.mark.parametrize(("n", "shape", "density", "clamp_ratio", "intra", "inter"), CASES)
def test_matches_independent_reference(n, shape, density, clamp_ratio, intra, inter):
    base, finetuned = _random_models(n, shape, seed=n * 1000 + len(shape))
    gen = torch.Generator().manual_seed(7)
    weights = (0.5 + 2.0 * torch.rand(n, generator=gen)).tolist()
    densities = [min(1.0, density * (1 + 0.5 * (i % 2))) for i in range(n)]
    options = PCBOptions(clamp_ratio=clamp_ratio, intra_balance=intra, inter_balance=inter)
    merged = pcb_merge(
        base, finetuned, weights=weights, densities=densities, lam=1.3, options=options
    )
    expected = reference_pcb(base, finetuned, weights, densities, 1.3, clamp_ratio, intra, inter)
    assert merged.shape == base.shape and merged.dtype == base.dtype
    assert relative_error(merged, expected, base) <= 1e-5


def test_hand_case_each_model_keeps_its_best_entry():
    # density 0.2 of 10 entries: the threshold is the sorted element at index 8,
    # so only each model's single top-scored entry survives, with scale 1.
    # Model 1's best score is entry 9 (largest |t| and agreeing with the sum);
    # model 2's is entry 0 (|t| = 2 dominates). Alone at its entry, each model's
    # value is w_i * t_i there, whatever its scale.
    base = torch.arange(10, dtype=torch.float32)
    t1 = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    t2 = torch.tensor([2.0] + [0.1] * 9)
    merged = pcb_merge(
        base,
        [base + t1, base + t2],
        weights=[1.5, 0.5],
        densities=[0.2, 0.2],
        lam=0.8,
        options=PCBOptions(clamp_ratio=0.0),
    )
    expected = base.clone()
    expected[0] += 0.8 * 0.5 * 2.0
    expected[9] += 0.8 * 1.5 * 1.0
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_hand_case_intra_only_rescale():
    # Inter-balancing off, no clamp, n = 2, density 0.3 of 10: threshold = sorted
    # index 7. Model 1: |t|/max = [0]*8 + [0.5, 1] -> intra exp(2 x^2) =
    # [1]*8 + [e^0.5, e^2]; the threshold is 1, so entry 8 has scale
    # s = (e^0.5 - 1) / (e^2 - 1) and entry 9 scale 1. Model 2 mirrors it:
    # entry 0 (|t| = 2) scale 1, entry 9 (|t| = 1, half the max) scale s.
    s = (math.exp(0.5) - 1) / (math.exp(2) - 1)
    base = torch.zeros(10)
    t1 = torch.tensor([0.0] * 8 + [0.5, 1.0])
    t2 = torch.tensor([-2.0] + [0.0] * 8 + [-1.0])
    w1, w2 = 1.2, 0.7
    merged = pcb_merge(
        base,
        [t1, t2],
        weights=[w1, w2],
        densities=[0.3, 0.3],
        options=PCBOptions(clamp_ratio=0.0, inter_balance=False),
    )
    expected = torch.zeros(10)
    expected[0] = -2.0 * w2
    expected[8] = 0.5 * w1
    expected[9] = (w1 * 1.0 * 1.0 + w2 * s * -1.0) / (1.0 + s)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_hand_case_outlier_clamp_limits_the_kept_value():
    # One model, clamp 0.1 of 10 entries: |t| is clamped into [sorted[1], sorted[8]]
    # = [0.2, 0.9]. The top score is entry 9 (tanh(t^2) breaks the intra tie with
    # entry 8), which is kept alone, at its CLAMPED value 0.9 instead of 1.0.
    t = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    merged = pcb_merge(
        torch.zeros(10),
        [t],
        weights=[1.0],
        densities=[0.1],
        options=PCBOptions(clamp_ratio=0.1),
    )
    expected = torch.zeros(10)
    expected[9] = 0.9
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.37, 0.5, 1.0])
def test_kept_share_per_model_is_density(density):
    # Entries strictly above the sorted element at index int(d * (1 - r)) are kept:
    # d - 1 - int(d * (1 - r)) of them, i.e. density to within one entry.
    base, finetuned = _random_models(3, (50, 40), seed=11)
    d = base.numel()
    contributions = pcb_contributions(base, finetuned, densities=[density] * 3)
    kept = (contributions.reshape(3, -1) != 0).sum(dim=1)
    expected = d - 1 - int(d * (1 - density))
    assert kept.tolist() == [expected] * 3
    assert abs(expected / d - density) <= 1 / d + 1e-12


def test_output_is_linear_in_the_per_model_weights():
    base, finetuned = _random_models(4, (30, 30), seed=3)
    densities = [0.2, 0.3, 0.2, 0.5]
    w_a = [1.0, 0.5, 2.0, 1.5]
    w_b = [0.3, 1.7, -0.4, 0.9]

    def delta(weights):
        return pcb_merge(base, finetuned, weights=weights, densities=densities) - base

    combined = delta([a + b for a, b in zip(w_a, w_b, strict=True)])
    torch.testing.assert_close(combined, delta(w_a) + delta(w_b), rtol=0, atol=1e-5)
    torch.testing.assert_close(delta([2 * a for a in w_a]), 2 * delta(w_a), rtol=0, atol=1e-5)
    # and equals sum_i w_i c_i from the contributions
    contributions = pcb_contributions(base, finetuned, densities=densities)
    by_contributions = (torch.tensor(w_a).reshape(4, 1, 1) * contributions).sum(dim=0)
    torch.testing.assert_close(delta(w_a), by_contributions, rtol=0, atol=1e-6)


def test_identical_finetunes_give_the_finetune_back():
    # With no drop and no clamp, only the single lowest-scored entry is dropped
    # (it equals the threshold); make that entry an unchanged one, so the
    # merge of n identical fine-tunes is exactly the fine-tune.
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(20, 20, generator=gen)
    delta = 0.05 * torch.randn(20, 20, generator=gen)
    delta[3, 4] = 0.0
    finetune = base + delta
    merged = pcb_merge(
        base,
        [finetune] * 4,
        weights=[1.0] * 4,
        densities=[1.0] * 4,
        options=PCBOptions(clamp_ratio=0.0),
    )
    torch.testing.assert_close(merged, finetune, rtol=0, atol=1e-6)


def test_identical_finetunes_with_drop_keep_finetune_where_kept():
    base, (finetune,) = _random_models(1, (40, 25), seed=9)
    merged = pcb_merge(
        base,
        [finetune] * 3,
        weights=[1.0] * 3,
        densities=[0.2] * 3,
        options=PCBOptions(clamp_ratio=0.0),
    )
    changed = merged != base
    torch.testing.assert_close(merged[changed], finetune[changed], rtol=0, atol=1e-6)
    assert changed.sum().item() == 1000 - 1 - int(1000 * 0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_task_vectors_give_exactly_the_base(dtype):
    base = torch.randn(17, 9).to(dtype)
    merged = pcb_merge(base, [base.clone()] * 3, weights=[1.0] * 3, densities=[0.2] * 3)
    assert merged.dtype == dtype
    assert torch.equal(merged, base)


def test_a_zero_task_vector_takes_no_part():
    # A model that left this tensor unchanged must not dilute the others' mean.
    # (intra-balance depends on the model count n, so it is off here.)
    base, finetuned = _random_models(2, (30, 10), seed=4)
    options = PCBOptions(intra_balance=False)
    alone = pcb_merge(base, finetuned, weights=[1.0, 1.0], densities=[0.3, 0.3], options=options)
    with_frozen = pcb_merge(
        base,
        [*finetuned, base.clone()],
        weights=[1.0] * 3,
        densities=[0.3] * 3,
        options=options,
    )
    torch.testing.assert_close(with_frozen, alone, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_out_computed_in_float32(dtype):
    base, finetuned = _random_models(3, (64, 48), seed=21, dtype=dtype)
    merged = pcb_merge(base, finetuned, weights=[1.0, 1.2, 0.8], densities=[0.2] * 3)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    in_float32 = pcb_merge(
        base.float(),
        [f.float() for f in finetuned],
        weights=[1.0, 1.2, 0.8],
        densities=[0.2] * 3,
    )
    # the half-precision result is the float32 result rounded once
    torch.testing.assert_close(merged, in_float32.to(dtype), rtol=0, atol=0)


def test_one_element_tensor_is_the_weighted_mean_of_task_vectors():
    # d = 1: every row's threshold is its maximum, so each non-zero model keeps
    # its only entry with scale 1 and the merge is the mean of w_i * t_i.
    base = torch.tensor([1.0])
    finetuned = [torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([1.0])]
    merged = pcb_merge(base, finetuned, weights=[1.0, 2.0, 1.0], densities=[0.2] * 3)
    torch.testing.assert_close(merged, torch.tensor([1.0 + (0.5 - 2.0) / 2]))


def test_tiny_tensor_keeps_the_top_scored_entry():
    # density * numel < 1: the threshold is the maximum; the top entry is kept.
    base = torch.zeros(4)
    t = torch.tensor([0.1, -0.2, 0.4, 0.3])
    merged = pcb_merge(
        base, [t], weights=[1.0], densities=[0.2], options=PCBOptions(clamp_ratio=0.0)
    )
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 0.4, 0.0]))
    # With the default clamp 0.01 the upper bound is sorted index int(4 * 0.99) - 1
    # = 2, i.e. 0.3: on tiny tensors the clamp already cuts the largest entry.
    merged = pcb_merge(base, [t], weights=[1.0], densities=[0.2])
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 0.3, 0.0]))


@pytest.mark.parametrize("n", [1, 2, 100, 300])
def test_any_number_of_models_gives_finite_results(n):
    base, finetuned = _random_models(n, (16, 16), seed=n)
    merged = pcb_merge(base, finetuned, weights=[1.0] * n, densities=[0.2] * n)
    assert torch.isfinite(merged).all()
    # a weighted mean of clamped task vectors stays within their range
    deltas = torch.stack([f - base for f in finetuned])
    assert (merged - base).abs().max() <= deltas.abs().max() + 1e-6


def test_empty_inputs():
    base = torch.zeros(0, 4)
    assert pcb_merge(base, [base], weights=[1.0], densities=[0.2]).shape == (0, 4)
    assert torch.equal(pcb_merge(torch.ones(3), [], weights=[], densities=[]), torch.ones(3))


def test_inputs_are_not_modified():
    base, finetuned = _random_models(2, (20, 20), seed=1)
    copies = [base.clone(), *[f.clone() for f in finetuned]]
    pcb_merge(base, finetuned, weights=[1.0, 1.0], densities=[0.2, 0.2])
    for before, after in zip(copies, [base, *finetuned], strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("bad", [-0.1, 0.5, 1.0, float("nan"), float("inf")])
def test_bad_clamp_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="clamp_ratio"):
        PCBOptions(clamp_ratio=bad)


def test_large_tensor_matches_reference():
    base, finetuned = _random_models(3, (600, 500), seed=77)
    weights, densities = [1.2, 0.9, 1.4], [0.1, 0.2, 0.3]
    merged = pcb_merge(base, finetuned, weights=weights, densities=densities)
    expected = reference_pcb(base, finetuned, weights, densities)
    assert relative_error(merged, expected, base) <= 1e-5


# --- the fast kernel against the plain chain of steps, bit for bit ----------------------


def _plain_rows(base, finetuned, densities, options):
    """Steps 1-5 as docs/algorithm.md writes them, one float32 operation after another,
    quantiles by a full sort: ``{i: (Tc_i, scale_i)}``."""
    base32 = base.reshape(-1).float()
    tvs = [f.reshape(-1).float() - base32 for f in finetuned]
    d, n = base32.numel(), len(tvs)
    colsum = torch.zeros(d)
    for t in tvs:
        colsum = colsum + t
    rows = {}
    for i, t in enumerate(tvs):
        if not bool((t != 0).any()):
            continue
        magnitude = t.abs()
        ordered = magnitude.sort().values
        if options.clamp_ratio > 0:
            lo_index, hi_index = clamp_indices(d, options.clamp_ratio)
            lo, hi = ordered[lo_index], ordered[hi_index]
            magnitude = magnitude.clamp(min=lo, max=hi)
        else:
            lo, hi = ordered[0], ordered[-1]
        low, high = (lo, hi) if lo <= hi else (hi, hi)
        inter = torch.tanh(t * colsum)
        clamped = torch.sign(t) * magnitude
        x = magnitude - low
        x = x / (high - low) if high - low > 0 else torch.zeros_like(x)
        intra = torch.exp(((x * x) - 1.0) * float(n))
        if options.intra_balance and options.inter_balance:
            score = intra * inter
        elif options.intra_balance:
            score = intra
        elif options.inter_balance:
            score = inter
        else:
            score = torch.ones(d)
        g = score.sort().values[drop_index(d, densities[i])]
        top = score.max()
        if top > g:
            scale = (score.clamp(min=g) - g) / (top - g)
        else:
            scale = (score == top).float()
        rows[i] = (clamped, scale)
    return rows


ROW_OPTIONS = [
    PCBOptions(),
    PCBOptions(clamp_ratio=0.0),
    PCBOptions(clamp_ratio=0.1),
    PCBOptions(intra_balance=False),
    PCBOptions(inter_balance=False),
    PCBOptions(intra_balance=False, inter_balance=False),
]


@pytest.mark.parametrize("options", ROW_OPTIONS, ids=lambda o: repr(o)[10:-1])
@pytest.mark.parametrize(
    "data", ["float32 small", "float32 large", "bf16 large", "frozen model", "one model"]
)
def test_rows_equal_the_plain_chain_bit_for_bit(data, options):
    # The score decides which entries are kept: any other rounding of it could swap
    # two entries an ulp apart at the threshold. So steps 1-5 must give the plain
    # chain's scales and Tc * scale exactly, on both sides of the sampled selection
    # (above 2^16 entries), for distinct values and for bf16 ties.
    if data == "float32 small":
        base, finetuned = _random_models(3, (40, 50), seed=3)
    elif data == "float32 large":
        base, finetuned = _random_models(3, (300, 400), seed=4)
    elif data == "bf16 large":
        base, finetuned = tie_heavy_models(4, 300_000, seed=5)
    elif data == "frozen model":
        base, finetuned = tie_heavy_models(3, 200_000, seed=6)
        finetuned[1] = base.clone()
    else:
        base, finetuned = tie_heavy_models(1, 200_000, seed=7)
    densities = [0.2, 0.05, 0.5, 0.1][: len(finetuned)]
    expected = _plain_rows(base, finetuned, densities, options)
    got = {}
    base32 = base.reshape(-1).float()
    for row in balanced_rows(base32, finetuned, densities, options):
        scale = row.scale()
        got[row.model] = (row.clamped * scale, scale.clone())
    assert got.keys() == expected.keys()
    for i, (weighted, scale) in got.items():
        assert torch.equal(scale, expected[i][1]), f"scale of model {i}"
        assert torch.equal(weighted, expected[i][0] * expected[i][1]), f"Tc * scale of model {i}"


def test_drop_ramp_equals_rescale_at_the_sorted_threshold():
    # The drop threshold tried from the sample and checked by the ramp's own counts,
    # hit or missed, gives the rescale of the exact threshold bit for bit.
    base, finetuned = tie_heavy_models(3, 400_000, seed=8)
    t = [f.float() - base.float() for f in finetuned]
    colsum = t[0] + t[1] + t[2]
    scores = [
        torch.exp((t[0].abs() / t[0].abs().max()).square() * 3) * torch.tanh(t[0] * colsum),
        torch.tanh(t[1] * colsum * 1e6),
        (t[2].abs() * 1e3).round(),
    ]
    spare = torch.empty(400_000)
    for score in scores:
        ordered = score.sort().values
        for density in (0.01, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0):
            g = ordered[drop_index(score.numel(), density)]
            expected = rescale(score.clone(), g, ordered[-1])
            ramp, span = drop_ramp(score.clone(), density, spare, selection_masks(400_000, "cpu"))
            assert torch.equal(ramp / span if span != 1.0 else ramp, expected), density


def test_undivided_contributions_are_the_plain_chains_rows_and_scale_sum():
    # Each kept row is s_i * Tc_i of the plain chain, bit for bit; the divisor is
    # max(sum_i s_i, eps); a model that left the tensor unchanged has no row. ``keep``
    # is handed each model's index with its row, and what it returns is kept.
    base, finetuned = tie_heavy_models(3, 200_000, seed=12)
    finetuned.append(base.clone())
    densities, options = [0.2, 0.05, 0.5, 0.3], PCBOptions()
    expected = _plain_rows(base, finetuned, densities, options)
    seen = []

    def keep(model: int, row: torch.Tensor) -> torch.Tensor:
        seen.append(model)
        return row.clone()

    undivided = undivided_contributions(
        base, finetuned, densities=densities, keep=keep, options=options
    )
    assert sorted(seen) == sorted(undivided.rows) == sorted(expected) == [0, 1, 2]
    for i, row in undivided.rows.items():
        assert torch.equal(row, expected[i][0] * expected[i][1]), f"model {i}"
    scale_sum = sum(scale for _, scale in expected.values()).clamp(min=1e-12)
    torch.testing.assert_close(undivided.scale_sum, scale_sum, rtol=1e-6, atol=0)
    assert undivided.scale_sum.min() >= 1e-12


@pytest.mark.parametrize(("intra", "inter"), [(True, True), (False, True), (True, False)])
def test_bf16_merge_of_a_large_tensor_matches_the_reference(intra, inter):
    # bf16 fine-tunes a few ulps from the base: tie-heavy task vectors and scores.
    # With both balances on, the selection masks live in the inter-balance buffer;
    # with intra off that buffer holds the score, so fresh masks are needed.
    base, finetuned = tie_heavy_models(3, (384, 256), seed=21)
    weights, densities = [1.0, 1.4, 0.8], [0.05, 0.2, 0.5]
    options = PCBOptions(intra_balance=intra, inter_balance=inter)
    merged = pcb_merge(
        base.float(), finetuned, weights=weights, densities=densities, options=options
    )
    expected = reference_pcb(base, finetuned, weights, densities, 1.0, 0.01, intra, inter)
    assert relative_error(merged, expected, base.float()) <= 1e-5


@CUDA
def test_bf16_merge_on_cuda_equals_the_cpu_one():
    gen = torch.Generator().manual_seed(41)
    shape = (512, 384)
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    finetuned = [
        (base.float() + 0.0003 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        for _ in range(3)
    ]
    kwargs = {"weights": [1.0, 1.0, 1.0], "densities": [0.05, 0.2, 0.5]}
    on_cpu = pcb_merge(base, finetuned, **kwargs)
    on_cuda = pcb_merge(base.cuda(), [t.cuda() for t in finetuned], **kwargs)
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.bfloat16
    # bf16 output: equal up to one rounding of the last place where exp/tanh differ.
    close = torch.isclose(on_cuda.cpu().float(), on_cpu.float(), rtol=2**-7, atol=0)
    assert close.float().mean() >= 0.999
