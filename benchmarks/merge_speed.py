"""Wall time and peak memory of mergekit merges: task_arithmetic, ties, pcb, pcb scope: model.

What it measures: on a synthetic Llama of about 160M parameters (vocab 32000, hidden
768, intermediate 3072, 12 layers, 12 heads, untied embeddings; a random base and 3
fine-tunes = base + shared drift + sparse private change, see
``mergekit_pcb.synthetic``), or of about 0.5B with ``--size 500m``, made offline once
and cached under ``benchmarks/output/models_<size>`` (the sets the other benchmarks
share), each method is run through mergekit's normal path: ``mergekit-yaml``'s entry
point in a fresh child process per run. Every method goes through the same launcher
(``python -c "import mergekit_pcb; from mergekit.scripts.run_yaml import main; main()"``),
so the import cost is equal and ``pcb`` does not depend on the start-up ``.pth`` hook.
``ties`` and ``pcb`` use the same density; every model has weight 1.

Runs are interleaved (TA, TIES, PCB, PCB-model, TA, ...) so that machine noise hits
all methods alike. The table gives each method's median wall time (``perf_counter``
around the child) and the largest peak RSS of its children (``os.wait4`` on the
child's pid, so each run's own ``ru_maxrss``), then the ratios the project targets:

* pcb time <= 0.7 x ties;
* pcb time <= 2.5 x task_arithmetic;
* pcb peak RSS <= 1.25 x ties;
* (``scope: model``) time <= 3 x pcb and peak RSS <= 1.5 x pcb.

With ``--cuda`` every child merges with mergekit's ``--cuda`` and the targets are the
GPU ones: ``pcb`` and ``pcb scope: model`` wall time <= 1.2 x ``ties``.
Peak RSS is still the host's; GPU memory per tensor is ``kernel_speed``'s to measure.

A FAIL is reported, not raised: the exit code is 0 unless a merge fails or writes
no weights. Timings are only meaningful on an otherwise idle machine; the load
average before and after is printed with the table.

Run after the dev install (from the repository root)::

    .venv/bin/python -m benchmarks.merge_speed
    .venv/bin/python -m benchmarks.merge_speed --repeats 1 --no-scope-model --json out.json
    python -m benchmarks.merge_speed --size 500m --cuda --repeats 1   # on a GPU machine
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import click
import torch
import yaml

from benchmarks import checkout
from benchmarks.synthetic import FINETUNES, SIZES, synthetic_models

LOG = logging.getLogger("merge_speed")

# Same launcher for all methods: mergekit-yaml's main with pcb registered.
LAUNCHER = "import mergekit_pcb; from mergekit.scripts.run_yaml import main; main()"

# label -> (merge_method, global parameters)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "pcb": ("pcb", {}),
    "pcb scope: model": ("pcb", {"scope": "model"}),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STDERR_TAIL = 3000  # characters of a failed child's stderr shown


class MergeFailed(click.ClickException):
    """A merge child exited non-zero or wrote no weights."""


def _models(size: str, directory: str | None, dtype: str) -> dict[str, str]:
    """The shared bfloat16 set of ``size``, or the same shapes in another dtype beside it."""
    if dtype == "bfloat16":
        return synthetic_models(size, directory)
    directory = directory or f"benchmarks/output/models_{size}"
    return synthetic_models(size, f"{directory.rstrip('/')}_{dtype}", DTYPES[dtype])


def _write_config(
    path: str,
    paths: dict[str, str],
    method: str,
    extra: dict[str, Any],
    density: float,
    dtype: str,
) -> None:
    per_model: dict[str, float] = {"weight": 1.0}
    if method != "task_arithmetic":
        per_model["density"] = density
    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [{"model": paths[n], "parameters": dict(per_model)} for n in FINETUNES],
        "dtype": dtype,
    }
    if extra:
        config["parameters"] = extra
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False)


def _weights_missing(out: str) -> str | None:
    """Why ``out`` holds no complete merged model, or None when it does."""
    if not os.path.isdir(out):
        return "no output folder"
    index = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as file:
            shards = set(json.load(file)["weight_map"].values())
        missing = sorted(s for s in shards if not os.path.exists(os.path.join(out, s)))
        return f"missing shards {missing}" if missing else None
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return None
    return "neither model.safetensors nor model.safetensors.index.json"


def _run(config: str, out: str, cuda: bool) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one merge in a child process."""
    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, config, out, "--quiet"] + (["--cuda"] if cuda else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert child.stderr is not None
    stderr = child.stderr.read()  # to EOF, so the child never blocks on a full pipe
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen consistent
    seconds = time.perf_counter() - began
    tail = stderr.decode(errors="replace")[-STDERR_TAIL:]
    if child.returncode != 0:
        raise MergeFailed(f"merge failed (exit {child.returncode}, {config}):\n{tail}")
    why = _weights_missing(out)
    if why:
        raise MergeFailed(f"merge wrote no usable weights ({why}): {out}\n{tail}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


@click.command()
@click.option("--workdir", default="benchmarks/output/merge_speed", show_default=True)
@click.option(
    "--models",
    default=None,
    help="where the synthetic models are made once and reused (other dtypes: "
    "<dir>_<dtype>)  [default: benchmarks/output/models_<size>]",
)
@click.option("--size", type=click.Choice(SIZES), default="160m", show_default=True)
@click.option("--cuda", is_flag=True, help="merge on the GPU (mergekit's --cuda); GPU targets")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--density",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="density of ties and pcb",
)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    type=click.Choice(list(DTYPES)),
    help="dtype of the models and of the merge",
)
@click.option(
    "--scope-model/--no-scope-model",
    default=True,
    show_default=True,
    help="also time pcb with scope: model",
)
@click.option("--json", "json_path", default=None, help="also write the results here")
def main(
    workdir: str,
    models: str | None,
    size: str,
    cuda: bool,
    repeats: int,
    density: float,
    dtype: str,
    scope_model: bool,
    json_path: str | None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(workdir, exist_ok=True)
    paths = _models(size, models, dtype)
    labels = [label for label in METHODS if scope_model or label != "pcb scope: model"]
    configs = {}
    for label in labels:
        method, extra = METHODS[label]
        configs[label] = os.path.join(workdir, label.replace(" ", "_").replace(":", "") + ".yml")
        _write_config(configs[label], paths, method, extra, density, dtype)

    revision = checkout()
    load_before = os.getloadavg()
    LOG.info("checkout %s, load average %.2f %.2f %.2f", revision, *load_before)
    times: dict[str, list[float]] = {label: [] for label in labels}
    peaks: dict[str, list[float]] = {label: [] for label in labels}
    out = os.path.join(workdir, "merged")
    for round_index in range(repeats):
        for label in labels:
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = _run(configs[label], out, cuda)
            times[label].append(seconds)
            peaks[label].append(peak)
            LOG.info("round %d %-18s %7.2f s %8.0f MiB", round_index + 1, label, seconds, peak)
    shutil.rmtree(out, ignore_errors=True)
    load_after = os.getloadavg()

    t = {label: statistics.median(v) for label, v in times.items()}
    m = {label: max(v) for label, v in peaks.items()}
    threads = torch.get_num_threads()
    print(
        f"\nsynthetic Llama ~{size.upper()} parameters, base + {len(FINETUNES)} fine-tunes, "
        f"{dtype}, density {density}, {_device(cuda, threads)}, checkout {revision}; "
        f"median of {repeats} runs, max peak RSS; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n"
    )
    print(
        "| method | median wall s | peak RSS MiB "
        "| time / ties | time / task_arithmetic | RSS / ties |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label in labels:
        print(
            f"| {label} | {t[label]:.2f} | {m[label]:.0f} | {t[label] / t['ties']:.2f} | "
            f"{t[label] / t['task_arithmetic']:.2f} | {m[label] / m['ties']:.2f} |"
        )
    checks = _checks(t, m, scope_model, cuda)
    print()
    for name, ratio, limit in checks:
        print(f"{'PASS' if ratio <= limit else 'FAIL'}  {name}: {ratio:.2f}")
    if json_path:
        result = {
            "size": size,
            "device": _device(cuda, threads),
            "dtype": dtype,
            "density": density,
            "repeats": repeats,
            "threads": threads,
            "checkout": revision,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "times": times,
            "peak_rss_mib": peaks,
            "median_s": t,
            "max_peak_rss_mib": m,
            "checks": [
                {"check": name, "ratio": ratio, "limit": limit, "pass": ratio <= limit}
                for name, ratio, limit in checks
            ],
        }
        with open(json_path, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
        LOG.info("wrote %s", json_path)


def _device(cuda: bool, threads: int) -> str:
    if cuda and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cuda" if cuda else f"cpu, {threads} threads"


def _checks(
    t: dict[str, float], m: dict[str, float], scope_model: bool, cuda: bool
) -> list[tuple[str, float, float]]:
    """(target, measured ratio, limit) for the device measured."""
    if cuda:
        checks = [("pcb time <= 1.2 x ties", t["pcb"] / t["ties"], 1.2)]
        if scope_model:
            checks.append(
                ("pcb scope: model time <= 1.2 x ties", t["pcb scope: model"] / t["ties"], 1.2)
            )
        return checks
    checks = [
        ("pcb time <= 0.7 x ties", t["pcb"] / t["ties"], 0.7),
        ("pcb time <= 2.5 x task_arithmetic", t["pcb"] / t["task_arithmetic"], 2.5),
        ("pcb peak RSS <= 1.25 x ties", m["pcb"] / m["ties"], 1.25),
    ]
    if scope_model:
        checks += [
            ("pcb scope: model time <= 3 x pcb", t["pcb scope: model"] / t["pcb"], 3.0),
            ("pcb scope: model peak RSS <= 1.5 x pcb", m["pcb scope: model"] / m["pcb"], 1.5),
        ]
    return checks


if __name__ == "__main__":
    main()
