"""Per-candidate cost of the evolver against a full merge and load per candidate.

On the shared synthetic Llama of about 160M parameters (base + 3 fine-tunes, bfloat16,
made offline and cached; ``benchmarks/synthetic.py``), two kinds of child process run
side by side in one invocation, alternating round by round so that machine noise hits
both alike; each measures its own work and is reaped with ``os.wait4`` for its own
peak RSS:

* ``evolver``: the live model (the base, loaded by transformers), the population
  (base and individuals in CPU memory, the offspring stored while judged), the merge
  planned once; then per candidate the offspring of one individual, the merge of the
  population with it written into the live model in place, and a trivial objective
  (one forward pass over 16 tokens). The set-up is reported apart (once per run);
* ``mergekit``: what an evolver without the in-memory merge would do per candidate:
  ``run_merge`` (mergekit-yaml's function) of the config to disk, then a transformers
  load of the result.

Targets, as ratios measured in the same run: a candidate (median over all rounds'
candidates) in <= 0.5 x the time of a merge and load (median over the rounds); the
evolver's peak RSS <= 2 x the merge-and-load child's (largest of the rounds each).
A FAIL is reported, not raised. Timings are only meaningful on an otherwise idle
machine: the load average before and after is printed with the table.

Run after the dev install, from the repository root::

    .venv/bin/python -m benchmarks.evolve_speed
    .venv/bin/python -m benchmarks.evolve_speed --method pcb --scope model --rounds 2
    python -m benchmarks.evolve_speed --size 500m --device cuda --rounds 1   # on a GPU machine

With ``--device cuda`` the live model and the population are on the GPU, the merge-and-load
child merges with mergekit-yaml's ``--cuda`` and loads onto the GPU, and the time target is
0.25 x (peak RSS is still the processes' CPU memory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import click
import torch
import yaml

from benchmarks import checkout
from benchmarks.synthetic import FINETUNES, SIZES, synthetic_models

LOG = logging.getLogger("evolve_speed")
STDERR_TAIL = 3000  # characters of a failed child's stderr shown
METHODS = ("pcb", "ties", "task_arithmetic", "dare_ties")


def _write_config(path: str, paths: dict[str, str], method: str, scope: str) -> None:
    per_model: dict[str, float] = {"weight": 1.0}
    if method != "task_arithmetic":
        per_model["density"] = 0.2
    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [{"model": paths[n], "parameters": dict(per_model)} for n in FINETUNES],
        "dtype": "bfloat16",
    }
    if method == "pcb":
        config["parameters"] = {"scope": scope}
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False)


def _objective(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(tokens).logits.float().mean())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _evolver_child(config_path: str, candidates: int, seed: int, device: str) -> dict[str, Any]:
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from mergekit_pcb.evolve.offspring import OffspringKey, generation_order, uniform_partner
    from mergekit_pcb.evolve.population import Population
    from mergekit_pcb.evolve.population_merge import PopulationMerge
    from mergekit_pcb.merge import load_config
    from mergekit_pcb.tune.placement import Placement

    began = time.perf_counter()
    config, _ = load_config(config_path)
    options = MergeOptions(quiet=True, random_seed=seed, device=device)
    base = str(config.base_model.model.path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device).eval()
    # On the CPU the population lives in CPU memory; on a GPU beside the live model.
    placement = Placement(mode="cpu" if device == "cpu" else "device")
    population = Population.load(config, options, placement=placement)
    merge = PopulationMerge(config, options, floating=population.floating())
    merge.write_fixed(model, population.base, population.members())
    tokens = torch.arange(1, 17, device=device).unsqueeze(0)
    _sync(device)
    setup = time.perf_counter() - began
    rows = []
    n = population.n
    order = generation_order(seed, 0, n)
    for index in range(candidates):
        individual = order[index % n]
        key = OffspringKey(seed, index // n, individual, uniform_partner(seed, 0, individual, n))
        t0 = time.perf_counter()
        child = population.offspring(key)
        _sync(device)
        t1 = time.perf_counter()
        merge.write_merge(model, population.base, population.members({individual: child}))
        _sync(device)
        t2 = time.perf_counter()
        _objective(model, tokens)
        t3 = time.perf_counter()
        rows.append({"offspring": t1 - t0, "merge": t2 - t1, "objective": t3 - t2})
    merge.close()
    return {"setup": setup, "candidates": rows, "describe": population.describe()}


def _mergekit_child(config_path: str, repeats: int, seed: int, device: str) -> dict[str, Any]:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from mergekit_pcb.merge import load_config

    config, _ = load_config(config_path)
    scratch = tempfile.mkdtemp(prefix="evolve_speed-")
    rows = []
    try:
        for _ in range(repeats):
            out = os.path.join(scratch, "merged")
            t0 = time.perf_counter()
            # mergekit-yaml --cuda merges on the GPU (MergeOptions.device).
            run_merge(config, out, MergeOptions(quiet=True, random_seed=seed, device=device))
            t1 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device)
            _sync(device)
            t2 = time.perf_counter()
            rows.append({"merge": t1 - t0, "load": t2 - t1})
            del model
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"runs": rows}


def _run_child(
    kind: str, config: str, count: int, seed: int, device: str
) -> tuple[dict[str, Any], float]:
    """A child's JSON result and its own peak RSS (MiB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [
        sys.executable,
        "-m",
        "benchmarks.evolve_speed",
        "--child",
        kind,
        "--child-config",
        config,
        "--child-result",
        result_path,
        "--candidates",
        str(count),
        "--seed",
        str(seed),
        "--device",
        device,
    ]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    stderr = child.stderr.read()  # to EOF, so the child never blocks on a full pipe
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    child.returncode = os.waitstatus_to_exitcode(status)
    try:
        if child.returncode != 0:
            tail = stderr.decode(errors="replace")[-STDERR_TAIL:]
            raise click.ClickException(f"{kind} child failed (exit {child.returncode}):\n{tail}")
        with open(result_path, encoding="utf-8") as file:
            return json.load(file), usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    finally:
        os.remove(result_path)


@click.command()
@click.option("--workdir", default="benchmarks/output/evolve_speed", show_default=True)
@click.option(
    "--models",
    default=None,
    help="where the synthetic models are made once and reused  [default: by --size]",
)
@click.option("--size", type=click.Choice(SIZES), default="160m", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="pcb", show_default=True)
@click.option(
    "--scope", type=click.Choice(["tensor", "model"]), default="tensor", show_default=True
)
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="rounds of one merge-and-load child and one evolver child",
)
@click.option(
    "--candidates", default=3, show_default=True, type=click.IntRange(min=1), help="per round"
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="cuda: the population beside a live model on the GPU, against mergekit-yaml --cuda "
    "(target: a candidate <= 0.25 x the merge and load)",
)
@click.option("--child", type=click.Choice(["evolver", "mergekit"]), hidden=True)
@click.option("--child-config", hidden=True)
@click.option("--child-result", hidden=True)
def main(
    workdir: str,
    models: str | None,
    size: str,
    method: str,
    scope: str,
    rounds: int,
    candidates: int,
    seed: int,
    device: str,
    child: str | None,
    child_config: str | None,
    child_result: str | None,
) -> None:
    if child is not None:
        assert child_config and child_result
        run = _evolver_child if child == "evolver" else _mergekit_child
        result = run(child_config, candidates, seed, device)
        with open(child_result, "w", encoding="utf-8") as file:
            json.dump(result, file)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(workdir, exist_ok=True)
    paths = synthetic_models(size, models)
    config = os.path.join(workdir, f"{method}-{scope}.yml")
    _write_config(config, paths, method, scope)
    revision = checkout()
    load_before = os.getloadavg()
    LOG.info("checkout %s, load average %.2f %.2f %.2f", revision, *load_before)
    full_runs: list[dict[str, float]] = []
    per: list[dict[str, float]] = []
    setups: list[float] = []
    full_peak = evolver_peak = 0.0
    describe = ""
    for round_index in range(rounds):
        full, peak = _run_child("mergekit", config, 1, seed, device)
        full_runs += full["runs"]
        full_peak = max(full_peak, peak)
        LOG.info(
            "round %d: merge and load %.2f s, peak RSS %.0f MiB",
            round_index + 1,
            full["runs"][0]["merge"] + full["runs"][0]["load"],
            peak,
        )
        evolver, peak = _run_child("evolver", config, candidates, seed, device)
        per += evolver["candidates"]
        setups.append(evolver["setup"])
        describe = evolver["describe"]
        evolver_peak = max(evolver_peak, peak)
        LOG.info(
            "round %d: evolver candidates %s s, peak RSS %.0f MiB",
            round_index + 1,
            [round(sum(row.values()), 2) for row in evolver["candidates"]],
            peak,
        )
    load_after = os.getloadavg()

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    totals = [row["offspring"] + row["merge"] + row["objective"] for row in per]
    t_candidate = statistics.median(totals)
    t_full = statistics.median(row["merge"] + row["load"] for row in full_runs)
    label = method + (" scope: model" if method == "pcb" and scope == "model" else "")
    print(
        f"\nsynthetic Llama ~{size.upper()} parameters, base + {len(FINETUNES)} fine-tunes, "
        f"bfloat16, {label} (density 0.2), {_device_text(device)}, "
        f"torch {torch.__version__}, checkout {revision}; {rounds} rounds, medians over "
        f"{len(per)} candidates and {len(full_runs)} merges and loads; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n"
    )
    print(f"population: {describe}\n")
    print("| step | seconds |")
    print("|---|---:|")
    rows = [
        ("evolver set-up (once: live model, population, plan)", statistics.median(setups)),
        ("offspring (stored while judged)", median(per, "offspring")),
        ("merge of the population into the live model", median(per, "merge")),
        ("objective (one forward pass, 16 tokens)", median(per, "objective")),
        ("evolver candidate, all three", t_candidate),
        ("mergekit run_merge to disk", median(full_runs, "merge")),
        ("transformers load of the merge", median(full_runs, "load")),
        ("merge and load", t_full),
    ]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    print(f"\npeak RSS: evolver {evolver_peak:.0f} MiB, merge and load {full_peak:.0f} MiB")
    limit = 0.25 if device == "cuda" else 0.5
    checks = [
        (f"candidate time <= {limit} x merge and load", t_candidate / t_full, limit),
        ("evolver peak RSS <= 2 x merge and load", evolver_peak / full_peak, 2.0),
    ]
    for name, ratio, limit in checks:
        print(f"{'PASS' if ratio <= limit else 'FAIL'}  {name}: {ratio:.2f}")
    with open(os.path.join(workdir, "last_run.json"), "w", encoding="utf-8") as file:
        json.dump(
            {
                "method": label,
                "device": _device_text(device),
                "checkout": revision,
                "load_average": [load_before, load_after],
                "evolver_setup": setups,
                "evolver_candidates": per,
                "evolver_peak_rss_mib": evolver_peak,
                "mergekit": full_runs,
                "mergekit_peak_rss_mib": full_peak,
            },
            file,
            indent=2,
        )


def _device_text(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
