"""Wall time and peak memory of mergekit merges: task_arithmetic, ties, pcb, pcb scope: model.

On a synthetic Llama of about 160M parameters (base + 3 fine-tunes, bfloat16, made
offline and cached under ``benchmarks/output/``), each method is run through
mergekit's normal path (``mergekit-yaml``'s entry point, in a fresh child process
per run, the same launcher for every method) with the same density for ``ties``
and ``pcb``. Runs are interleaved (TA, TIES, PCB, PCB-model, TA, ...) so that
machine noise hits all methods alike; the table gives median wall time and the
largest peak RSS of each child (``os.wait4``), and the ratios the project targets.

Run after the dev install:  ``.venv/bin/python benchmarks/merge_speed.py``
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

import click
import torch
import yaml
from synthetic_160m import DEFAULT_DIR, models_160m  # benchmarks/ is on sys.path

LOG = logging.getLogger("merge_speed")

# Same launcher for all methods: mergekit-yaml's main with pcb registered.
LAUNCHER = "import sys, mergekit_pcb; from mergekit.scripts.run_yaml import main; main()"

METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "pcb": ("pcb", {}),
    "pcb scope: model": ("pcb", {"scope": "model"}),
}


def _write_config(
    path: str, paths: dict[str, str], method: str, extra: dict, density: float
) -> None:
    per_model = {"weight": 1.0}
    if method != "task_arithmetic":
        per_model["density"] = density
    config = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [
            {"model": paths[n], "parameters": dict(per_model)} for n in ("math", "code", "chat")
        ],
        "dtype": "bfloat16",
    }
    if extra:
        config["parameters"] = extra
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file)


def _run(config: str, out: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one merge in a child process."""
    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, config, out, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"merge failed ({config}):\n{stderr.decode()[-3000:]}")
    if not any(f.endswith(".safetensors") for f in os.listdir(out)):
        raise click.ClickException(f"merge wrote no weights: {out}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


@click.command()
@click.option("--workdir", default="benchmarks/output/merge_speed", show_default=True)
@click.option(
    "--models",
    default=DEFAULT_DIR,
    show_default=True,
    help="where the synthetic models are made once and reused",
)
@click.option("--repeats", default=3, show_default=True)
@click.option("--density", default=0.2, show_default=True)
@click.option("--json", "json_path", default=None, help="also write the results here")
def main(workdir: str, models: str, repeats: int, density: float, json_path: str | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(workdir, exist_ok=True)
    paths = models_160m(models)
    configs = {}
    for label, (method, extra) in METHODS.items():
        configs[label] = os.path.join(workdir, label.replace(" ", "_").replace(":", "") + ".yml")
        _write_config(configs[label], paths, method, extra, density)

    times: dict[str, list[float]] = {label: [] for label in METHODS}
    peaks: dict[str, list[float]] = {label: [] for label in METHODS}
    out = os.path.join(workdir, "merged")
    for round_index in range(repeats):
        for label in METHODS:
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = _run(configs[label], out)
            times[label].append(seconds)
            peaks[label].append(peak)
            LOG.info("round %d %-18s %7.2f s %8.0f MiB", round_index + 1, label, seconds, peak)
    shutil.rmtree(out, ignore_errors=True)

    t = {label: statistics.median(v) for label, v in times.items()}
    m = {label: max(v) for label, v in peaks.items()}
    print(
        f"\nsynthetic Llama ~160M parameters, base + 3 fine-tunes, bf16, density {density}, "
        f"{torch.get_num_threads()} threads; median of {repeats} runs, max peak RSS\n"
    )
    print("| method | wall s | peak RSS MiB | time / ties | time / task_arithmetic | RSS / ties |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in METHODS:
        print(
            f"| {label} | {t[label]:.2f} | {m[label]:.0f} | {t[label] / t['ties']:.2f} | "
            f"{t[label] / t['task_arithmetic']:.2f} | {m[label] / m['ties']:.2f} |"
        )
    checks = [
        ("pcb time <= 0.7 x ties", t["pcb"] / t["ties"], 0.7),
        ("pcb time <= 2.5 x task_arithmetic", t["pcb"] / t["task_arithmetic"], 2.5),
        ("pcb peak RSS <= 1.25 x ties", m["pcb"] / m["ties"], 1.25),
        ("pcb scope: model time <= 3 x pcb", t["pcb scope: model"] / t["pcb"], 3.0),
        ("pcb scope: model peak RSS <= 1.5 x pcb", m["pcb scope: model"] / m["pcb"], 1.5),
    ]
    print()
    for name, ratio, limit in checks:
        print(f"{'PASS' if ratio <= limit else 'FAIL'}  {name}: {ratio:.2f}")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as file:
            json.dump({"times": times, "peak_rss_mib": peaks, "density": density}, file, indent=2)


if __name__ == "__main__":
    main()
