"""Per-candidate cost of ``mergekit-pcb-tune`` against a full ``pcb`` merge per candidate.

On a synthetic Llama of about 160M parameters (base + 3 fine-tunes, bfloat16, made
offline and cached), measured side by side in one run:

* ``capture``: the tuner's one-off pass computing every model's contributions;
* ``tuner candidate``: writing one candidate into the live model (``Contributions.apply``);
* ``full merge``: what a tuner without the linearity would do per candidate, a full
  ``pcb`` merge by mergekit (``run_merge`` to disk) and loading the result;
* ``objective``: one evaluation of a small validation loss, the same for both, so
  it is reported apart.

Run after the dev install:  ``.venv/bin/python benchmarks/tune_speed.py``
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time

import click
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from synthetic_160m import DEFAULT_DIR, models_160m  # benchmarks/ is on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergekit_pcb  # noqa: F401  (registers pcb)
from mergekit_pcb.tune.capture import capture_contributions
from mergekit_pcb.tune.objectives import Example, completion_loss

LOG = logging.getLogger("tune_speed")


def _config(paths: dict[str, str], weights: list[float]) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": "pcb",
            "base_model": paths["base"],
            "models": [
                {"model": paths[n], "parameters": {"weight": w, "density": 0.2}}
                for n, w in zip(["math", "code", "chat"], weights, strict=True)
            ],
            "dtype": "bfloat16",
        }
    )


@click.command()
@click.option("--workdir", default="benchmarks/output/tune_speed", show_default=True)
@click.option(
    "--models",
    default=DEFAULT_DIR,
    show_default=True,
    help="where the synthetic models are made once and reused",
)
@click.option("--candidates", default=5, show_default=True, help="candidates timed per method")
def main(workdir: str, models: str, candidates: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    os.makedirs(workdir, exist_ok=True)
    paths = models_160m(models)
    gen = torch.Generator().manual_seed(1)
    weights = [[1.0, 1.0, 1.0]] + [
        (0.5 + 2.5 * torch.rand(3, generator=gen)).tolist() for _ in range(candidates - 1)
    ]
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    examples = [Example(f"{i}+{i}=", str(2 * i)) for i in range(8)]

    began = time.perf_counter()
    contributions = capture_contributions(_config(paths, weights[0]), MergeOptions(quiet=True))
    capture = time.perf_counter() - began
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
    contributions.load_fixed(model)

    tuner, objective, full = [], [], []
    scratch = tempfile.mkdtemp(prefix="tune_speed-")
    try:
        for w in weights:
            began = time.perf_counter()
            contributions.apply(model, w)
            tuner.append(time.perf_counter() - began)
            began = time.perf_counter()
            completion_loss(model, tokenizer, examples)
            objective.append(time.perf_counter() - began)

            out = os.path.join(scratch, "merged")
            began = time.perf_counter()
            run_merge(_config(paths, w), out, options=MergeOptions(quiet=True))
            merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
            full.append(time.perf_counter() - began)
            del merged
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n_params = sum(p.numel() for p in model.parameters())
    t_tuner, t_full = statistics.median(tuner), statistics.median(full)
    t_objective = statistics.median(objective)
    rows = [
        ("capture (once per run)", capture),
        ("tuner candidate (in place)", t_tuner),
        ("full pcb merge + load per candidate", t_full),
        ("objective (8 examples, both)", t_objective),
    ]
    print(
        f"\nsynthetic Llama, {n_params / 1e6:.0f}M parameters, base + 3 fine-tunes, bf16, "
        f"{torch.get_num_threads()} threads; medians over {candidates} candidates\n"
    )
    print("| step | seconds |")
    print("|---|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    ratio = t_full / t_tuner
    print(
        f"\nper-candidate speed-up, objective excluded: {ratio:.1f}x "
        f"(target >= 10x: {'PASS' if ratio >= 10 else 'FAIL'})"
    )
    print(f"with the objective included: {(t_full + t_objective) / (t_tuner + t_objective):.1f}x")
    print(
        f"break-even: capture pays for itself after {capture / (t_full - t_tuner):.1f} candidates"
    )
    with open(os.path.join(workdir, "last_run.yml"), "w", encoding="utf-8") as file:
        yaml.safe_dump(
            {"capture": capture, "tuner": tuner, "full": full, "objective": objective}, file
        )


if __name__ == "__main__":
    main()
