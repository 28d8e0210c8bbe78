"""Wall time of a tuning run: serial against ``--workers N`` (Ray actors), same search.

On the tiny example models (a base and 3 fine-tunes, ``pcb``), the objective is a
validation loss over enough rows that one candidate takes about ``--seconds`` (1 s)
serially: a larger validation set, as a real tuning run has. Both runs are the
library's ``tune()`` in this process with the same seed and budget:

* ``serial``: every candidate in this process, with the faster of 1 thread and
  torch's default (every core) as measured first: a tiny model gains nothing from
  more threads, and on busy cores they can cost far more than they bring;
* ``--workers N``: a local Ray cluster started for the run, N actors (one torch
  thread per core each), the candidates of each batch spread over them.

Reported: the wall time of each run (the parallel one from starting Ray to its
shutdown), the Ray set-up apart (cluster and actors started, contributions shipped,
actors ready), the time spent evaluating, the speed-ups, and whether the two
histories are the same. The cores of a shared machine are not all free, so the
ceiling is measured too, before and after the runs: the same objective in N plain
processes at once against one alone, without Ray. ``--popsize`` defaults to 8, a
multiple of 2 workers, so that no worker idles at the end of a generation (CMA-ES's
own default for 3 models is 7).

Run after the dev install (with the ray extra), from the repository root:
``.venv/bin/python -m benchmarks.parallel_speed``
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_pcb.synthetic import write_tiny_models
from mergekit_pcb.tune import objectives
from mergekit_pcb.tune.job import tune
from mergekit_pcb.tune.parallel import RayWorkers
from mergekit_pcb.tune.records import BatchEvaluator, Candidate, Evaluation, SerialEvaluator
from mergekit_pcb.tune.search import SearchSettings

LOG = logging.getLogger("parallel_speed")


class _Timed:
    """A batch evaluator that adds up the time spent in it (not the search's own)."""

    def __init__(self, inner: BatchEvaluator[Candidate, Evaluation]):
        self.inner = inner
        self.seconds = 0.0

    def evaluate_batch(self, candidates: Sequence[Candidate]) -> Iterator[Evaluation]:
        began = time.perf_counter()
        for evaluation in self.inner.evaluate_batch(candidates):
            self.seconds += time.perf_counter() - began
            yield evaluation
            began = time.perf_counter()
        self.seconds += time.perf_counter() - began


def _serial(objective: objectives.Objective, timed: list[_Timed]):
    """The evaluator factory for tune()'s own serial evaluation, timed."""

    def factory(contributions: Any, model: Any, tokenizer: Any) -> _Timed:
        timed.append(_Timed(SerialEvaluator(contributions.scorer(model, tokenizer, objective))))
        return timed[-1]

    return factory


def _rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{i} + {i % 97} =", "completion": f" {i + i % 97}"} for i in range(n)]


def _calibrate(path: str, base: str, seconds: float) -> tuple[int, dict[int, float]]:
    """Set this process's torch threads to the faster count (1, or torch's default);
    write enough rows to ``path`` that a loss over them then takes ``seconds``.

    Returns the rows and the seconds per row for each thread count tried.
    """
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    probe = [objectives.Example(r["prompt"], r["completion"]) for r in _rows(256)]
    per_row = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        objectives.completion_loss(model, tokenizer, probe)  # warm-up
        times = []
        for _ in range(3):
            began = time.perf_counter()
            objectives.completion_loss(model, tokenizer, probe)
            times.append((time.perf_counter() - began) / len(probe))
        per_row[threads] = min(times)
    best = min(per_row, key=per_row.get)
    torch.set_num_threads(best)
    n = max(16, round(seconds / per_row[best]))
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in _rows(n))
    return n, per_row


def _objective_seconds(base: str, val: str, repeats: int) -> float:
    """Seconds per loss over ``val`` in a fresh process with one torch thread."""
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    objective = objectives.validation_loss([val])
    objective(model, tokenizer)  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        objective(model, tokenizer)
    return (time.perf_counter() - began) / repeats


def _ceiling(base: str, val: str, workers: int, repeats: int = 3) -> float:
    """How much faster ``workers`` plain processes get through the objective than one:
    the most that ``workers`` Ray actors can gain on this machine now."""
    context = multiprocessing.get_context("spawn")
    times = []
    for processes in (1, workers):
        pool = context.Pool(processes)
        times.append(max(pool.starmap(_objective_seconds, [(base, val, repeats)] * processes)))
        pool.close()  # and join: a terminated pool leaves semaphores behind
        pool.join()
    return workers * times[0] / times[1]


def _config(path: str, models: dict[str, str]) -> str:
    import yaml

    config = {
        "merge_method": "pcb",
        "base_model": models["base"],
        "models": [
            {"model": p, "parameters": {"weight": 1.0, "density": 0.2}}
            for name, p in models.items()
            if name != "base"
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file)
    return path


@click.command()
@click.option("--workdir", default="benchmarks/output/parallel_speed", show_default=True)
@click.option("--workers", default=2, show_default=True, help="Ray actors of the parallel run")
@click.option("--budget", default=200, show_default=True, help="evaluations of each run")
@click.option("--popsize", default=8, show_default=True, help="CMA-ES population")
@click.option("--seconds", default=1.0, show_default=True, help="objective time per candidate")
@click.option("--seed", default=1, show_default=True)
def main(workdir: str, workers: int, budget: int, popsize: int, seconds: float, seed: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("mergekit_pcb.tune.parallel").setLevel(logging.INFO)
    os.makedirs(workdir, exist_ok=True)
    models = write_tiny_models(os.path.join(workdir, "models"))
    config = _config(os.path.join(workdir, "pcb.yml"), models)
    val = os.path.join(workdir, "val.jsonl")
    rows, per_row = _calibrate(val, models["base"], seconds)
    settings = SearchSettings(budget=budget, popsize=popsize, seed=seed)
    identity = {"kind": "benchmark", "val_rows": rows}
    runs = {}
    for name in ("serial", "parallel"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    ceiling = [_ceiling(models["base"], val, workers)]

    objective = objectives.validation_loss([val])
    timed: list[_Timed] = []
    began = time.perf_counter()
    runs["serial"] = tune(
        config,
        os.path.join(workdir, "serial"),
        objective,
        settings,
        identity_objective=identity,
        quiet=True,
        make_evaluator=_serial(objective, timed),
    )
    serial_wall = time.perf_counter() - began
    serial_search = timed[0].seconds

    objective = objectives.validation_loss([val])
    began = time.perf_counter()
    with RayWorkers(workers, objective) as pool:
        parallel_timed: list[_Timed] = []

        def factory(contributions: Any, model: Any, tokenizer: Any) -> _Timed:
            parallel_timed.append(_Timed(pool(contributions, model, tokenizer)))
            return parallel_timed[-1]

        runs["parallel"] = tune(
            config,
            os.path.join(workdir, "parallel"),
            objective,
            settings,
            identity_objective=identity,
            quiet=True,
            make_evaluator=factory,
        )
    parallel_wall = time.perf_counter() - began
    parallel_search = parallel_timed[0].seconds
    setup = pool.setup
    ceiling.append(_ceiling(models["base"], val, workers))

    serial_rows = [(e.index, e.weights, e.score) for e in runs["serial"].history]
    parallel_rows = [(e.index, e.weights, e.score) for e in runs["parallel"].history]
    objective_s = [e.objective_seconds for e in runs["serial"].history]
    worker_objective_s = [e.objective_seconds for e in runs["parallel"].history]
    n = len(runs["serial"].history)
    print(
        f"\ntiny models (base + 3 fine-tunes, pcb); validation loss over {rows} rows; "
        f"budget {budget}, popsize {popsize}, seed {seed}: {n} evaluations; "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), "
        f"torch {torch.__version__}; serial run with {torch.get_num_threads()} torch "
        "thread(s), measured per row: "
        + ", ".join(f"{t} thread(s) {s * 1000:.2f} ms" for t, s in per_row.items())
        + "\n"
    )
    print(f"| | serial | --workers {workers} |")
    print("|---|---:|---:|")
    print(f"| wall time of the run | {serial_wall:.1f} s | {parallel_wall:.1f} s |")
    print(
        f"| Ray set-up (cluster and actors started; contributions shipped; actors ready "
        f"after the capture) | - | {setup['total']:.1f} s ({setup['cluster']:.1f} + "
        f"{setup['ship']:.2f} + {setup['workers']:.1f}) |"
    )
    print(f"| evaluating the candidates | {serial_search:.1f} s | {parallel_search:.1f} s |")
    print(
        f"| objective per candidate (mean) | {sum(objective_s) / n:.2f} s | "
        f"{sum(worker_objective_s) / n:.2f} s |"
    )
    print(
        f"\nspeed-up: {serial_wall / parallel_wall:.2f}x on the whole run, "
        f"{serial_search / parallel_search:.2f}x on the evaluations; "
        f"without the set-up {serial_wall / (parallel_wall - setup['total']):.2f}x"
    )
    print(
        f"ceiling now: {workers} plain processes at once get through the objective "
        f"{ceiling[0]:.2f}x (before the runs) and {ceiling[1]:.2f}x (after) as fast as one"
    )
    same = serial_rows == parallel_rows
    print(f"same history (indices, weights, scores): {'yes' if same else 'NO'}")
    if not same:
        diff = sum(a != b for a, b in zip(serial_rows, parallel_rows, strict=False))
        print(f"  {diff} rows differ; lengths {len(serial_rows)} and {len(parallel_rows)}")


if __name__ == "__main__":
    main()
