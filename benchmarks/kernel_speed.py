"""Per-tensor time and peak extra memory of ``pcb`` against mergekit's built-in methods.

What it measures: one call of mergekit's ``merge_tensors`` (the function a merge runs
per output tensor) for ``task_arithmetic``, ``ties``, ``dare_ties`` and ``pcb``, on
the current device, with bfloat16 inputs (a base and n fine-tunes), density 0.2 and
weight 1 for every model; two shapes of a 7-8B Llama (4096 x 4096, 14336 x 4096) and
n = 3 and 8. Each figure is the median of ``--repeats`` timed calls after
``--warmup`` untimed ones; methods are interleaved round by round so that machine
noise hits them alike.

Inputs are tie-heavy like real bf16 fine-tunes: base ~ N(0, 0.02) rounded to bf16;
each fine-tune moves every entry by k bf16 units in the last place,
k = round(N(0, ``--ulps``)) clipped to [-8, 8] (about 20% of entries unchanged at the
default 2.0). A task vector then holds only a few hundred distinct magnitudes, so
exact quantiles meet huge blocks of equal values.

Peak extra memory, per call, beyond the inputs already resident (the result counts):

* CUDA: ``torch.cuda.max_memory_allocated()`` after a reset, minus the memory
  allocated before the call;
* CPU: after all timed calls, one more call per method and row: the process's peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its
  resident set before the call. ``pcb``'s CPU work-buffer pool (``mergekit_pcb.work_buffers``)
  is emptied before each of these calls, so its buffers count as the call's own
  (between the tensors of a merge they stay resident: up to 512 MiB per thread).
  For these calls glibc is told to serve every
  allocation of 1 MiB or more by ``mmap`` (``mallopt``), so that a freed tensor
  leaves the resident set at once and the kernel's high-water mark follows the live
  tensors (the timed calls run under the allocator's usual settings). Where this is
  unavailable (not Linux/glibc) CPU memory is reported as not measured
  (``--no-cpu-memory`` skips it).

Targets, reported as PASS/FAIL lines, never raised:

* CUDA: pcb time <= 1.5 x ties and pcb peak extra memory <= ties, on every row;
* CPU: pcb time <= 3 x task_arithmetic and <= 0.3 x ties, pcb peak extra memory
  <= ties (the CPU targets are set for 4096 x 4096, n = 3; they are checked on every
  row measured).

Why the selection constants are what they are
---------------------------------------------

The constants of ``mergekit_pcb.selection`` and the passes of ``mergekit_pcb.pcb``
were chosen from these figures, recorded while the kernel was written (checkouts
0d2d8ac to 2f85799, and 73bd160 for mixed dtypes; 2026-11-28) on this project's CPU
machine (2 cores shared with other work, hence spreads rather than single values),
on bf16 task vectors like the inputs above (16.7M entries) unless said otherwise.
The H100 figures (58.7M entries) were reported from elsewhere; this project has not
yet measured on a GPU.

* ``DIRECT_SELECT = 2^16`` (rows above it go through a sample): on 16.7M entries one
  quantile costs two to four counting passes of 15-20 ms each, where a whole-row
  ``kthvalue`` took 240 ms and a ``topk`` of 20% 600 ms. On an H100 a ``topk`` of
  20% takes 1.4 ms and a sort 3.2 ms, against about 0.1 ms per elementwise pass
  (estimated from memory bandwidth), so CUDA uses the sample too
  (``DIRECT_SELECT_ON`` is empty): chosen from those figures, not measured.
* ``_sample_size``: 2^12 below 2^22 entries, 2^15 above. A small sample costs less to
  draw and sort; on very large rows a larger one narrows the bracket enough to pay
  for itself (measured on rows of 0.6M to 25M entries).
* ``select_whole`` selects with ``topk`` of the smaller side, not ``kthvalue``: medians
  of 0.5-0.6 ms against 11 ms on 65,536 entries, 10-19 ms against 9-27 ms on the
  0.3-0.6M entries a bracket leaves; on CUDA ``kthvalue`` runs one thread block per
  row (420-460 ms on 58.7M entries on an H100).
* ``nonzero_count`` counts int32 bit patterns: torch's float ``count_nonzero`` took
  40 ms on 16.7M entries with scattered zeros, the integer one 5 ms.
* ``pcb.inter_balance`` skips the CPU ``tanh`` where it is the identity: the CPU
  ``tanh`` costs about seven elementwise passes, the check one reduction.
* ``work_buffers.POOL_BYTES``: a fresh buffer's page faults (one per 4 KiB page on its
  first write) cost about three elementwise passes over it.
* Mixed dtypes: the CPU adds a bf16 tensor into a float32 one element by element,
  28 ms against 7 ms for a conversion and a float32 add (16.8M entries). Hence
  ``work_buffers.flat_float32`` converts a half-precision base once, and the tuner
  adds its bf16 base through a small conversion buffer (``mergekit_pcb/tune``).

Run from the repository root after the dev install::

    .venv/bin/python -m benchmarks.kernel_speed                      # cuda if available
    .venv/bin/python -m benchmarks.kernel_speed --device cpu --shapes small --models 3
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import click
import torch
from mergekit.merge_methods import merge_tensors

import mergekit_pcb  # noqa: F401  (registers pcb)
from benchmarks import checkout
from mergekit_pcb.work_buffers import release_work_buffers

LOG = logging.getLogger("kernel_speed")

METHODS = ("task_arithmetic", "ties", "dare_ties", "pcb")
SHAPES = {
    "small": ((4096, 4096),),
    "large": ((14336, 4096),),
    "full": ((4096, 4096), (14336, 4096)),
}
MAX_ULPS = 8
MIB = 1 << 20
# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass
class Row:
    shape: tuple[int, int]
    n: int
    ms: dict[str, float]
    peak_mib: dict[str, float | None]


def tie_heavy_inputs(
    shape: tuple[int, int], n: int, ulps: float, device: str, seed: int
) -> list[torch.Tensor]:
    """``[base, finetuned...]`` in bfloat16: fine-tunes differ by a few bf16 ulps."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    bits = base.view(torch.int16)
    sign = bits & -0x8000
    magnitude = bits & 0x7FFF
    tensors = [base]
    for _ in range(n):
        steps = torch.randn(shape, generator=gen, device=device).mul_(ulps).round_()
        steps = steps.clamp_(-MAX_ULPS, MAX_ULPS).to(torch.int16)
        # Moving the magnitude's bit pattern moves the value by whole ulps (across an
        # exponent boundary too); clipping keeps the sign and stays below inf.
        moved = (magnitude + steps).clamp_(0, 0x7F7F)
        tensors.append((sign | moved).view(torch.bfloat16))
    return tensors


def _parameters(method: str, density: float) -> dict[str, float]:
    if method == "task_arithmetic":
        return {"weight": 1.0}
    return {"weight": 1.0, "density": density}


class CpuPeak:
    """Peak resident set over a call, from the kernel's high-water mark (Linux, glibc)."""

    def __init__(self) -> None:
        self.available = False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._reset()
            self.available = True
        except (OSError, AttributeError):
            LOG.warning("CPU memory is not measured: needs Linux with glibc")

    def enable(self) -> bool:
        """Serve allocations of 1 MiB or more by mmap, returned to the system at free.

        Without it glibc keeps freed blocks below 32 MiB in its heap, so the resident
        set would not follow the live tensors. Done after the timed calls, which run
        under the allocator's usual settings.
        """
        if self.available:
            ok = self._libc.mallopt(_M_MMAP_THRESHOLD, MIB) and self._libc.mallopt(
                _M_TRIM_THRESHOLD, MIB
            )
            self.available = bool(ok)
        return self.available

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
            file.write("5")  # resets VmHWM to the current RSS

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def extra_mib(self, call: Callable[[], torch.Tensor]) -> float:
        self._reset()
        before = self._status_kib("VmRSS")
        out = call()
        peak = self._status_kib("VmHWM")
        del out
        return (peak - before) / 1024


def timed(call: Callable[[], torch.Tensor], device: str) -> tuple[float, float | None]:
    """Seconds of one call, and on CUDA its peak extra MiB (None elsewhere)."""
    if device != "cuda":
        began = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - began
        del out
        return seconds, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    began = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() - before) / MIB
    del out
    return seconds, peak


def _calls(
    shape: tuple[int, int], n: int, device: str, density: float, ulps: float, seed: int
) -> dict[str, Callable[[], torch.Tensor]]:
    tensors = tie_heavy_inputs(shape, n, ulps, device, seed)
    return {
        method: (
            lambda method=method: merge_tensors(
                tensors, method, parameters=_parameters(method, density), base_index=0
            )
        )
        for method in METHODS
    }


def describe_inputs(shape: tuple[int, int], device: str, ulps: float, seed: int) -> str:
    """How tie-heavy the first fine-tune's task vector is."""
    base, first = tie_heavy_inputs(shape, 1, ulps, device, seed)
    delta = (first.float() - base.float()).abs_()
    distinct = torch.unique(delta).numel()
    zeros = 100 * float((delta == 0).float().mean())
    return f"{distinct} distinct |t| values among {delta.numel()}, {zeros:.0f}% zeros"


def time_row(
    shape: tuple[int, int],
    n: int,
    *,
    device: str,
    density: float,
    ulps: float,
    warmup: int,
    repeats: int,
    seed: int,
) -> Row:
    calls = _calls(shape, n, device, density, ulps, seed)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    peaks: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_index in range(warmup + repeats):
        for method in METHODS:
            seconds, peak = timed(calls[method], device)
            LOG.info(
                "%d x %d n=%d %s %d %-16s %9.1f ms%s",
                *shape,
                n,
                "warm-up" if round_index < warmup else "round",
                round_index + 1 - (0 if round_index < warmup else warmup),
                method,
                1000 * seconds,
                "" if peak is None else f"  {peak:.0f} MiB",
            )
            if round_index >= warmup:
                times[method].append(seconds)
                if peak is not None:
                    peaks[method].append(peak)
    return Row(
        shape=shape,
        n=n,
        ms={m: 1000 * statistics.median(v) for m, v in times.items()},
        peak_mib={m: max(v) if v else None for m, v in peaks.items()},
    )


def cpu_memory_row(row: Row, cpu_peak: CpuPeak, *, density: float, ulps: float, seed: int) -> None:
    """One call per method, peak extra resident memory into ``row``."""
    calls = _calls(row.shape, row.n, "cpu", density, ulps, seed)
    for method in METHODS:
        release_work_buffers()
        row.peak_mib[method] = cpu_peak.extra_mib(calls[method])
        LOG.info(
            "%d x %d n=%d memory %-16s %6.0f MiB", *row.shape, row.n, method, row.peak_mib[method]
        )


def _mib(value: float | None) -> str:
    return "n/m" if value is None else f"{value:.0f}"


def print_table(rows: Sequence[Row]) -> None:
    print(
        "| tensor | n | "
        + " | ".join(f"{m} ms" for m in METHODS)
        + " | pcb / ties | pcb / task_arithmetic | "
        + " | ".join(f"{m} peak MiB" for m in METHODS)
        + " |"
    )
    print("|---|---:|" + "---:|" * (2 * len(METHODS) + 2))
    for row in rows:
        times = " | ".join(f"{row.ms[m]:.1f}" for m in METHODS)
        peaks = " | ".join(_mib(row.peak_mib[m]) for m in METHODS)
        print(
            f"| {row.shape[0]} x {row.shape[1]} | {row.n} | {times} | "
            f"{row.ms['pcb'] / row.ms['ties']:.2f} | "
            f"{row.ms['pcb'] / row.ms['task_arithmetic']:.2f} | {peaks} |"
        )


def checks(rows: Sequence[Row], device: str) -> list[tuple[str, bool | None]]:
    """(description, passed) per target and row; passed is None when not measured."""
    out: list[tuple[str, bool | None]] = []
    for row in rows:
        label = f"{row.shape[0]} x {row.shape[1]}, n={row.n}"
        t, m = row.ms, row.peak_mib
        if device == "cuda":
            ratios = [("pcb time <= 1.5 x ties", t["pcb"] / t["ties"], 1.5)]
        else:
            ratios = [
                ("pcb time <= 3 x task_arithmetic", t["pcb"] / t["task_arithmetic"], 3.0),
                ("pcb time <= 0.3 x ties", t["pcb"] / t["ties"], 0.3),
            ]
        for name, ratio, limit in ratios:
            out.append((f"{label}: {name}: {ratio:.2f}", ratio <= limit))
        if m["pcb"] is None or m["ties"] is None:
            out.append((f"{label}: pcb peak extra memory <= ties: not measured", None))
        else:
            out.append(
                (
                    f"{label}: pcb peak extra memory <= ties: "
                    f"{m['pcb']:.0f} vs {m['ties']:.0f} MiB",
                    m["pcb"] <= m["ties"],
                )
            )
    return out


@click.command()
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="default: cuda if available, else cpu",
)
@click.option(
    "--shapes",
    type=click.Choice(list(SHAPES)),
    default="full",
    show_default=True,
    help="small: 4096 x 4096; large: 14336 x 4096; full: both",
)
@click.option(
    "--models",
    default="3,8",
    show_default=True,
    help="comma-separated numbers of fine-tunes",
)
@click.option(
    "--density", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True)
)
@click.option(
    "--ulps",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="standard deviation of the fine-tunes' changes, in bf16 units in the last place",
)
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--cpu-memory/--no-cpu-memory",
    default=True,
    show_default=True,
    help="on CPU, measure peak memory (serves allocations of 1 MiB or more by mmap)",
)
@click.option("--json", "json_path", default=None, help="also write the results here")
def main(
    device: str | None,
    shapes: str,
    models: str,
    density: float,
    ulps: float,
    warmup: int,
    repeats: int,
    seed: int,
    cpu_memory: bool,
    json_path: str | None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda, but torch sees no CUDA device")
    counts = [int(v) for v in models.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        raise click.BadParameter("--models needs positive integers, e.g. 3,8")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        memory = (
            "torch.cuda.max_memory_allocated minus the memory allocated before the call, "
            "max over the timed calls"
        )
    else:
        name = f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
        memory = "not measured"
    load_before = os.getloadavg()
    began = time.perf_counter()
    rows = []
    inputs = []
    for shape in SHAPES[shapes]:
        inputs.append(f"{shape[0]} x {shape[1]}: {describe_inputs(shape, device, ulps, seed)}")
        LOG.info("inputs %s", inputs[-1])
        for n in counts:
            rows.append(
                time_row(
                    shape,
                    n,
                    device=device,
                    density=density,
                    ulps=ulps,
                    warmup=warmup,
                    repeats=repeats,
                    seed=seed,
                )
            )
    if device == "cpu" and cpu_memory:
        cpu_peak = CpuPeak()
        if cpu_peak.enable():
            memory = (
                "peak RSS (VmHWM after clear_refs) minus RSS before the call, one call per "
                "method after the timed ones, allocations of 1 MiB or more served by mmap"
            )
            for row in rows:
                cpu_memory_row(row, cpu_peak, density=density, ulps=ulps, seed=seed)
    elapsed = time.perf_counter() - began
    load_after = os.getloadavg()

    print(
        f"\ndevice: {name}; torch {torch.__version__}; mergekit "
        f"{importlib.metadata.version('mergekit')}; checkout {checkout()}\n"
        f"merge_tensors, bf16 inputs (fine-tunes = base + round(N(0, {ulps})) bf16 ulps), "
        f"density {density}; median of {repeats} after {warmup} warm-up; "
        f"peak extra memory: {memory}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {elapsed:.0f} s in all\n"
        f"task vector of model 1: {'; '.join(inputs)}\n"
    )
    print_table(rows)
    print()
    for description, passed in checks(rows, device):
        verdict = "n/m " if passed is None else ("PASS" if passed else "FAIL")
        print(f"{verdict}  {description}")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as file:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "density": density,
                    "ulps": ulps,
                    "repeats": repeats,
                    "memory": memory,
                    "rows": [asdict(row) for row in rows],
                },
                file,
                indent=2,
            )


if __name__ == "__main__":
    main()
