"""Per-candidate cost of ``mergekit-pcb-tune`` against a full ``pcb`` merge per candidate.

On a synthetic Llama of about 160M parameters (base + 3 fine-tunes, bfloat16, made
offline and cached), measured side by side in one run:

* ``capture``: the tuner's one-off pass computing every model's contributions;
* ``tuner candidate``: writing one candidate into the live model (``Contributions.apply``),
  and on the CPU beside it the previous tuner's way (dense float32 contributions, one
  ``tensordot`` per tensor), so that the compact storage's cost per candidate shows;
* ``per-layer candidate``: the same with one weight per layer and model (each model's
  weight a gradient with a point per layer, as ``--layer-points`` searches it), beside
  the one weight per model (target: within 1.2x);
* ``contributions``: bytes per parameter per model of the compact storage;
* ``full merge``: what a tuner without the linearity would do per candidate, a full
  ``pcb`` merge by mergekit (``run_merge`` to disk) and loading the result;
* ``objective``: one evaluation of a small validation loss, the same for both, so
  it is reported apart.

Run after the dev install, from the repository root:  ``.venv/bin/python -m benchmarks.tune_speed``
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import mergekit_pcb  # noqa: F401  (registers pcb)
from benchmarks.synthetic import SIZES, synthetic_models
from mergekit_pcb.tune.capture import capture_contributions, plan_weights
from mergekit_pcb.tune.objectives import Example, completion_loss
from mergekit_pcb.tune.weight_layout import WeightLayout, layout_for

LOG = logging.getLogger("tune_speed")


def _raw(paths: dict[str, str], weights: list[float]) -> dict:
    return {
        "merge_method": "pcb",
        "base_model": paths["base"],
        "models": [
            {"model": paths[n], "parameters": {"weight": w, "density": 0.2}}
            for n, w in zip(["math", "code", "chat"], weights, strict=True)
        ],
        "dtype": "bfloat16",
    }


def _config(paths: dict[str, str], weights: list[float]) -> MergeConfiguration:
    return MergeConfiguration.model_validate(_raw(paths, weights))


def _per_layer_layout(paths: dict[str, str], options: MergeOptions) -> WeightLayout:
    """One gradient point per layer for each model's weight, positions from mergekit."""
    raw = _raw(paths, [1.0, 1.0, 1.0])
    layers = AutoConfig.from_pretrained(paths["base"]).num_hidden_layers
    names = [m["model"] for m in raw["models"]]
    return layout_for(raw, names, layer_points=layers).resolved(
        raw, lambda r: plan_weights(r, options)
    )


def _dense_apply(contributions, dense: dict[str, torch.Tensor], model, weights) -> None:
    """The previous tuner's candidate: float32 (n, numel) contributions, one tensordot."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, terms in contributions.terms.items():
            w = torch.tensor([float(weights[i]) for i in sorted(terms.rows)])
            merged = torch.tensordot(w, dense[name], dims=1) if len(w) else 0.0
            merged = (terms.base.reshape(-1).float() + terms.lam * merged).view(terms.shape)
            params[name].copy_(merged)


@click.command()
@click.option("--workdir", default="benchmarks/output/tune_speed", show_default=True)
@click.option(
    "--models",
    default=None,
    help="where the synthetic models are made once and reused  [default: by --size]",
)
@click.option("--size", type=click.Choice(SIZES), default="160m", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--candidates", default=5, show_default=True, help="candidates timed per method")
def main(workdir: str, models: str | None, size: str, device: str, candidates: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    os.makedirs(workdir, exist_ok=True)
    paths = synthetic_models(size, models)
    gen = torch.Generator().manual_seed(1)
    weights = [[1.0, 1.0, 1.0]] + [
        (0.5 + 2.5 * torch.rand(3, generator=gen)).tolist() for _ in range(candidates - 1)
    ]
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    examples = [Example(f"{i}+{i}=", str(2 * i)) for i in range(8)]
    options = MergeOptions(quiet=True, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    began = time.perf_counter()
    contributions = capture_contributions(_config(paths, weights[0]), options)
    sync()
    capture = time.perf_counter() - began
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16).to(device)
    contributions.load_fixed(model)
    n_params = sum(t.numel for t in contributions.terms.values())
    per_parameter = contributions.bytes_per_parameter_per_model
    # The previous tuner's storage, for the side-by-side per-candidate time (CPU only:
    # 4 bytes per parameter per model do not fit beside a 7B model on a GPU anyway).
    dense = None
    if device == "cpu":
        dense = {
            name: torch.stack([terms.rows[i].dense() for i in sorted(terms.rows)])
            if terms.rows
            else torch.zeros(0, terms.numel)
            for name, terms in contributions.terms.items()
        }

    per_model_layout = contributions.layout
    per_layer_layout = _per_layer_layout(paths, options)
    points = per_layer_layout.size // 3  # each model's gradient: one point per layer

    def per_layer_candidate(per_model: list[float]) -> list[float]:
        jitter = (0.8 + 0.4 * torch.rand(3 * points, generator=gen)).tolist()
        return [per_model[k // points] * jitter[k] for k in range(3 * points)]

    per_layer_numbers = [per_layer_candidate(w) for w in weights]
    tuner, per_layer, previous, objective, full = [], [], [], [], []
    scratch = tempfile.mkdtemp(prefix="tune_speed-")
    try:
        for w, numbers in zip(weights, per_layer_numbers, strict=True):
            contributions.layout = per_layer_layout
            sync()
            began = time.perf_counter()
            contributions.apply(model, numbers)
            sync()
            per_layer.append(time.perf_counter() - began)
            contributions.layout = per_model_layout
            sync()
            began = time.perf_counter()
            contributions.apply(model, w)
            sync()
            tuner.append(time.perf_counter() - began)
            if dense is not None:
                began = time.perf_counter()
                _dense_apply(contributions, dense, model, w)
                previous.append(time.perf_counter() - began)
                contributions.apply(model, w)
            began = time.perf_counter()
            completion_loss(model, tokenizer, examples)
            sync()
            objective.append(time.perf_counter() - began)

            out = os.path.join(scratch, "merged")
            began = time.perf_counter()
            run_merge(_config(paths, w), out, options=options)
            merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device)
            sync()
            full.append(time.perf_counter() - began)
            del merged
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    t_tuner, t_full = statistics.median(tuner), statistics.median(full)
    t_objective = statistics.median(objective)
    rows = [
        ("capture (once per run)", capture),
        ("tuner candidate (in place, compact contributions)", t_tuner),
        (
            f"per-layer candidate ({per_layer_layout.size} weights: a point per layer and model)",
            statistics.median(per_layer),
        ),
    ]
    if previous:
        rows.append(
            ("previous tuner candidate (dense float32 contributions)", statistics.median(previous))
        )
    rows += [
        ("full pcb merge + load per candidate", t_full),
        ("objective (8 examples, both)", t_objective),
    ]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"\nsynthetic Llama, {n_params / 1e6:.0f}M parameters, base + 3 fine-tunes, bf16, "
        f"pcb density 0.2, {name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"medians over {candidates} candidates\n"
    )
    print("| step | seconds |")
    print("|---|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    print(
        f"\ncontributions: {contributions.row_bytes} bytes, {per_parameter:.3f} bytes per "
        f"parameter per model (target <= 1.25: {'PASS' if per_parameter <= 1.25 else 'FAIL'})"
    )
    if previous:
        ratio = t_tuner / statistics.median(previous)
        print(
            f"per-candidate time against the previous dense tuner: {ratio:.2f}x "
            f"(target <= 1.0: {'PASS' if ratio <= 1.0 else 'FAIL'})"
        )
    layer_ratio = statistics.median(per_layer) / t_tuner
    print(
        f"per-layer candidate against one weight per model: {layer_ratio:.2f}x "
        f"(target <= 1.2: {'PASS' if layer_ratio <= 1.2 else 'FAIL'})"
    )
    speedup = t_full / t_tuner
    target = 100 if device.startswith("cuda") else 10
    print(
        f"per-candidate speed-up over a full merge, objective excluded: {speedup:.1f}x "
        f"(target >= {target}x: {'PASS' if speedup >= target else 'FAIL'})"
    )
    print(f"with the objective included: {(t_full + t_objective) / (t_tuner + t_objective):.1f}x")
    print(
        f"break-even: capture pays for itself after {capture / (t_full - t_tuner):.1f} candidates"
    )
    with open(os.path.join(workdir, "last_run.yml"), "w", encoding="utf-8") as file:
        yaml.safe_dump(
            {
                "capture": capture,
                "tuner": tuner,
                "per_layer": per_layer,
                "previous": previous,
                "full": full,
                "objective": objective,
                "bytes_per_parameter_per_model": per_parameter,
            },
            file,
        )


if __name__ == "__main__":
    main()
