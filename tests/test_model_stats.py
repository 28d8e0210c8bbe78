"""Whole-model statistics (mergekit_pcb.model_stats): streamed, exact, on their inputs' device.

Merges with them are checked against the reference PCB on the concatenated tensors.
(``scope: model`` inside a mergekit merge is tested in test_method.py.)
"""

from __future__ import annotations

import pytest
import torch

from mergekit_pcb.model_stats import whole_model_stats
from mergekit_pcb.pcb import PCBOptions, pcb_merge
from tests.reference_pcb import reference_pcb, relative_error
from tests.simulated_device import SimulatedDevice

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed: int, n: int, shapes):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    finetuned = [[b + 0.02 * torch.randn(b.shape, generator=gen) for b in base] for _ in range(n)]
    return base, finetuned


def _whole_model_merge(base, finetuned, weights, densities, lam, options):
    n = len(finetuned)

    def stream():
        for k, b in enumerate(base):
            yield str(k), b, [finetuned[i][k] for i in range(n)]

    stats = whole_model_stats(stream, densities, options, progress=False)
    return [
        pcb_merge(
            b,
            [finetuned[i][k] for i in range(n)],
            weights=weights,
            densities=densities,
            lam=lam,
            options=options,
            stats=stats,
        )
        for k, b in enumerate(base)
    ]


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("clamp_ratio", [0.0, 0.01, 0.1])
def test_whole_model_matches_spec_on_concatenation(density, clamp_ratio):
    shapes = [(40, 30), (17,), (1,), (64, 9), (3, 3)]
    base, finetuned = _model(int(density * 100 + clamp_ratio * 1000), 3, shapes)
    finetuned[1][2] = base[2].clone()  # one model leaves one tensor unchanged
    weights, densities = [1.3, 0.7, 1.1], [density, min(1.0, density * 1.5), density]
    options = PCBOptions(clamp_ratio=clamp_ratio)
    merged = torch.cat(
        [
            m.reshape(-1)
            for m in _whole_model_merge(base, finetuned, weights, densities, 1.2, options)
        ]
    )
    flat_base = torch.cat([b.reshape(-1) for b in base])
    flat = [torch.cat([t.reshape(-1) for t in ft]) for ft in finetuned]
    expected = reference_pcb(flat_base, flat, weights, densities, 1.2, clamp_ratio)
    assert relative_error(merged, expected, flat_base) <= 1e-5


def test_single_tensor_model_gives_the_per_tensor_result_exactly():
    base, finetuned = _model(4, 3, [(50, 40)])
    for options in (PCBOptions(), PCBOptions(clamp_ratio=0.0, inter_balance=False)):
        (whole,) = _whole_model_merge(
            base, finetuned, [1.0, 1.5, 0.5], [0.2, 0.1, 0.3], 1.0, options
        )
        per_tensor = pcb_merge(
            base[0],
            [f[0] for f in finetuned],
            weights=[1.0, 1.5, 0.5],
            densities=[0.2, 0.1, 0.3],
            options=options,
        )
        assert torch.equal(whole, per_tensor)


def test_all_zero_model_takes_no_part():
    base, finetuned = _model(8, 2, [(20, 10), (5,)])
    frozen = [b.clone() for b in base]
    options = PCBOptions(intra_balance=False)  # intra depends on n
    without = _whole_model_merge(base, finetuned, [1.0, 1.0], [0.3, 0.3], 1.0, options)
    with_frozen = _whole_model_merge(base, [*finetuned, frozen], [1.0] * 3, [0.3] * 3, 1.0, options)
    for a, b in zip(without, with_frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_tensors_that_are_not_floating_point_are_passed_over():
    base, finetuned = _model(3, 2, [(30, 20)])
    counter = torch.tensor([7])  # an integer buffer, e.g. a step count

    def stream():
        yield "w", base[0], [f[0] for f in finetuned]
        yield "step", counter, [counter, counter]

    with_buffer = whole_model_stats(stream, [0.2, 0.3], PCBOptions(), progress=False, n_tensors=2)

    def floats_only():
        yield "w", base[0], [f[0] for f in finetuned]

    assert with_buffer == whole_model_stats(floats_only, [0.2, 0.3], PCBOptions(), progress=False)


def _stream_model(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(150, 100), (50,), (70, 30)]
    base = [(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16).float() for s in shapes]
    finetuned = [
        [(b + 0.001 * torch.randn(b.shape, generator=gen)).to(torch.bfloat16).float() for b in base]
        for _ in range(n)
    ]

    def stream():
        for k, b in enumerate(base):
            yield str(k), b, [finetuned[i][k] for i in range(n)]

    return base, finetuned, stream


def test_whole_model_stats_run_on_their_input_device():
    base, finetuned, stream = _stream_model(31, 3)
    options = PCBOptions(clamp_ratio=0.01)
    expected = whole_model_stats(stream, [0.2, 0.05, 0.5], options, progress=False)
    inputs = base + [t for model in finetuned for t in model]
    with SimulatedDevice(inputs) as device:
        got = whole_model_stats(stream, [0.2, 0.05, 0.5], options, progress=False)
    assert not device.mixed, f"operations mixing devices: {device.mixed}"
    assert got == expected


@CUDA
def test_whole_model_stats_and_merge_on_cuda_equal_the_cpu_ones():
    base, finetuned, stream = _stream_model(32, 3)
    densities, weights = [0.2, 0.05, 0.5], [1.0, 1.2, 0.9]
    options = PCBOptions(clamp_ratio=0.01)

    def cuda_stream():
        for name, b, fts in stream():
            yield name, b.cuda(), [t.cuda() for t in fts]

    on_cpu = whole_model_stats(stream, densities, options, progress=False)
    on_cuda = whole_model_stats(cuda_stream, densities, options, progress=False)
    for cpu_stats, cuda_stats in zip(on_cpu, on_cuda, strict=True):
        # |t| is exact on both devices; the score goes through exp and tanh.
        assert (cuda_stats.clamp_lo, cuda_stats.clamp_hi) == (
            cpu_stats.clamp_lo,
            cpu_stats.clamp_hi,
        )
        assert cuda_stats.threshold == pytest.approx(cpu_stats.threshold, rel=1e-5, abs=1e-12)
        assert cuda_stats.top == pytest.approx(cpu_stats.top, rel=1e-5)
    for k, b in enumerate(base):
        fts = [finetuned[i][k] for i in range(3)]
        merged_cpu = pcb_merge(
            b, fts, weights=weights, densities=densities, options=options, stats=on_cpu
        )
        merged_cuda = pcb_merge(
            b.cuda(),
            [t.cuda() for t in fts],
            weights=weights,
            densities=densities,
            options=options,
            stats=on_cuda,
        )
        assert relative_error(merged_cuda.cpu(), merged_cpu.double(), b) <= 1e-5
