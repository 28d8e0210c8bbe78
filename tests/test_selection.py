"""Exact quantiles on tie-heavy rows, and whole-model statistics on their input's device.

Every selected value is checked against a full sort of the row, at the ranks the
method uses: the outlier-clamp indices and the drop index for the densities of the
released settings.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from mergekit_pcb import core
from mergekit_pcb.core import PCBOptions, _kth_smallest, clamp_indices, drop_index, pcb_merge
from mergekit_pcb.whole_model import RadixSelect, whole_model_stats
from tests.conftest import write_config
from tests.reference_pcb import reference_pcb, relative_error

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
        got = _kth_smallest(row, index).item()
        assert got == ordered[index].item(), f"rank {index}"
    # The same through the callers' reusable masks.
    masks = core._selection_masks(row.numel(), row.device)
    for index in _ranks(row.numel()):
        assert _kth_smallest(row, index, masks).item() == ordered[index].item()


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
    real_select = core._select

    def spy(values: torch.Tensor, index: int) -> torch.Tensor:
        sizes.append(values.numel())
        return real_select(values, index)

    monkeypatch.setattr(core, "_select", spy)
    row = ROWS[kind](d, 5)
    for index in _ranks(d):
        _kth_smallest(row, index)
    assert max(sizes, default=0) <= 0.12 * d


def test_a_device_flipped_to_whole_row_selection_stays_exact(monkeypatch):
    monkeypatch.setitem(core._DIRECT_SELECT_ON, "cpu", 1 << 62)
    selected: list[int] = []
    real_select = core._select
    monkeypatch.setattr(
        core, "_select", lambda v, i: selected.append(v.numel()) or real_select(v, i)
    )
    row = ROWS["bf16 |t|"](200_000, 4)
    ordered = torch.sort(row).values
    for index in _ranks(row.numel()):
        assert _kth_smallest(row, index).item() == ordered[index].item()
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
        assert _kth_smallest(row, index).item() == ordered[index].item()


def test_selection_falls_back_when_the_sample_misses(monkeypatch):
    row = torch.arange(300_000, dtype=torch.float32).flip(0)
    real_randint = torch.randint

    def only_the_top(high, size, **kwargs):  # a sample of the largest values only
        return real_randint(0, 100, size, **kwargs)

    monkeypatch.setattr(torch, "randint", only_the_top)
    assert _kth_smallest(row, 150_000).item() == 150_000.0


@pytest.mark.parametrize(("intra", "inter"), [(True, True), (False, True), (True, False)])
def test_bf16_merge_of_a_large_tensor_matches_the_reference(intra, inter):
    # bf16 fine-tunes a few ulps from the base: tie-heavy task vectors and scores.
    # With both balances on, the selection masks live in the inter-balance buffer;
    # with intra off that buffer holds the score, so fresh masks are needed.
    gen = torch.Generator().manual_seed(21)
    shape = (384, 256)
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    finetuned = []
    for _ in range(3):
        steps = (torch.randn(shape, generator=gen) * 2).round().clamp(-8, 8).to(torch.int16)
        bits = base.view(torch.int16)
        moved = ((bits & 0x7FFF) + steps).clamp(0, 0x7F7F)
        finetuned.append(((bits & -0x8000) | moved).view(torch.bfloat16))
    weights, densities = [1.0, 1.4, 0.8], [0.05, 0.2, 0.5]
    options = PCBOptions(intra_balance=intra, inter_balance=inter)
    merged = pcb_merge(
        base.float(), finetuned, weights=weights, densities=densities, options=options
    )
    expected = reference_pcb(base, finetuned, weights, densities, 1.0, 0.01, intra, inter)
    assert relative_error(merged, expected, base.float()) <= 1e-5


# --- whole-model statistics follow the device of their inputs ------------------------


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (torch.Tensor, list, tuple)):
        return [t for item in obj for t in _tensors(item)]  # not .tolist() results
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


class SimulatedDevice(TorchFunctionMode):
    """CPU tensors that behave, for device checks, as if on an accelerator.

    The given inputs, and every tensor computed from them, are "on the device":
    their ``.device`` reads ``meta`` inside the mode, and a tensor created with that
    device (``torch.zeros(..., device=x.device)``) is made on the CPU but counts as
    on the device. An operation mixing tensors on the device with other tensors of
    one or more dimensions is what CUDA refuses ("Expected all tensors to be on the
    same device"): it is recorded in ``mixed``. So a buffer created on a fixed
    device shows up, although everything runs on the CPU.
    """

    FAKE = torch.device("meta")

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.mixed: list[str] = []
        for tensor in inputs:
            self._mark(tensor)

    @staticmethod
    def _mark(tensor: torch.Tensor) -> None:
        tensor._on_simulated_device = True

    @staticmethod
    def _marked(tensor: torch.Tensor) -> bool:
        return getattr(tensor, "_on_simulated_device", False)

    def _swap_device(self, obj):
        """``obj`` with the fake device replaced by the CPU; whether it held one."""
        if obj == self.FAKE or obj == "meta":
            return torch.device("cpu"), True
        if isinstance(obj, (list, tuple)):
            swapped = [self._swap_device(item) for item in obj]
            return type(obj)(s for s, _ in swapped), any(f for _, f in swapped)
        return obj, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the .device getter
            return self.FAKE if self._marked(args[0]) else func(*args, **kwargs)
        args, fake_arg = self._swap_device(args)
        swapped = {k: self._swap_device(v) for k, v in kwargs.items()}
        kwargs = {k: v for k, (v, _) in swapped.items()}
        fake = fake_arg or any(f for _, f in swapped.values())
        inputs = _tensors(args) + _tensors(kwargs)
        on_device = [t for t in inputs if self._marked(t)]
        elsewhere = [t for t in inputs if not self._marked(t) and t.dim() > 0]
        if on_device and elsewhere:
            self.mixed.append(getattr(func, "__name__", repr(func)))
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        moved_off = name == "cpu" or ("device" in kwargs and not fake)
        if moved_off and isinstance(result, torch.Tensor) and self._marked(result):
            return result.view(result.shape)  # .cpu() of a CPU tensor returns itself
        if (on_device or fake) and not moved_off:
            for tensor in _tensors(result):
                self._mark(tensor)
        return result


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
    assert device._marked(select.high) and all(device._marked(h) for h in select.low)
    ordered = torch.sort(values).values
    assert got == [ordered[r].item() for r in (0, 15_000, 29_999)]


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
def test_selection_on_cuda_matches_a_full_sort():
    for kind in ("bf16 |t|", "bf16 |t| 1-2 ulps", "two values 80/20", "block at 0.2-0.5"):
        row = ROWS[kind](300_000, 5).cuda()
        ordered = torch.sort(row).values
        for index in _ranks(row.numel()):
            assert _kth_smallest(row, index).item() == ordered[index].item(), (kind, index)


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


@CUDA
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_mergekit_merge_with_cuda_equals_the_cpu_merge(scope, tiny_models, tmp_path):
    # The failure: scope: model with --cuda stopped at a CPU histogram.
    config_path = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, parameters={"scope": scope, "clamp_ratio": 0.02}
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    merged = {}
    for cuda in (False, True):
        out = str(tmp_path / f"out-cuda-{cuda}")
        run_merge(config, out, options=MergeOptions(quiet=True, cuda=cuda))
        merged[cuda] = load_file(f"{out}/model.safetensors")
    base = load_file(f"{tiny_models['base']}/model.safetensors")
    names = sorted(merged[False])
    flat = {cuda: torch.cat([m[k].reshape(-1) for k in names]) for cuda, m in merged.items()}
    flat_base = torch.cat([base[k].reshape(-1) for k in names])
    assert relative_error(flat[True], flat[False].double(), flat_base) <= 1e-5
