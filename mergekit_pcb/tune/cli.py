"""``mergekit-pcb-tune``: search the per-model ``weight`` of a ``pcb`` config with CMA-ES.

Wires the pieces together: the config's contributions are captured once
(``linear.py``), each candidate is written into one live transformers model and
scored by an objective (``objectives.py``), the search and its history are in
``search.py``. Outputs, in OUT_DIR: ``best.yml`` (a mergekit config with the tuned
weights), ``history.jsonl``, ``run.json``, ``scores.png``, ``summary.json`` and, with
``--write-model``, the merged model written by mergekit from ``best.yml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict

import click
import torch
import yaml
from mergekit.options import MergeOptions

from mergekit_pcb.cli import load_config, merge_into
from mergekit_pcb.tune import objectives
from mergekit_pcb.tune.linear import LinearMerge, capture_linear_merge, tuned_model_names
from mergekit_pcb.tune.search import (
    Evaluation,
    SearchResult,
    SearchSettings,
    _write_atomic,
    prepare_run_dir,
    run_search,
)

LOG = logging.getLogger(__name__)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def best_config_yaml(raw: dict, model_names: Sequence[str], coefficients: Sequence[float]) -> str:
    """The original config with each tuned model's ``weight`` set to its coefficient."""
    raw = copy.deepcopy(raw)
    base = str(raw.get("base_model"))
    by_name = dict(zip(model_names, coefficients, strict=True))
    for entry in raw["models"]:
        name = str(entry["model"])
        if name != base:
            entry.setdefault("parameters", {})
            entry["parameters"] = dict(entry["parameters"] or {}, weight=float(by_name[name]))
    header = "# Written by mergekit-pcb-tune: the tuned merge. Run: mergekit-yaml best.yml OUT\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def _check_apart(val: Sequence[str], test: Sequence[str]) -> None:
    val_ids = {os.path.realpath(p): _sha256_file(p) for p in val}
    for path in test:
        if os.path.realpath(path) in val_ids or _sha256_file(path) in val_ids.values():
            raise click.ClickException(
                f"test file {path} is also a validation file: tune on validation data only"
            )


def build_objective(
    kind: str,
    val: Sequence[str],
    combine: str,
    function: str | None,
    maximize: bool | None,
    lm_eval_tasks: Sequence[str],
    lm_eval_limit: int | None,
):
    normalized = combine == "normalized"
    if kind in ("loss", "exact-match"):
        if not val:
            raise click.ClickException(f"--objective {kind} needs at least one --val FILE")
        make = objectives.validation_loss if kind == "loss" else objectives.validation_exact_match
        return make(val, normalized)
    if kind == "function":
        if not function or maximize is None:
            raise click.ClickException(
                "--objective function needs --function pkg.module:function and "
                "--maximize or --minimize"
            )
        return objectives.load_user_objective(function, maximize)
    if not lm_eval_tasks:
        raise click.ClickException("--objective lm-eval needs at least one --lm-eval-task")
    return objectives.LmEvalObjective(lm_eval_tasks, lm_eval_limit)


def _load_model(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _plot(history: list[Evaluation], maximize: bool, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in history if e.ok]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([e.index for e in ok], [e.score for e in ok], s=12, label="candidate")
    best, line = None, []
    for e in history:
        if e.ok and (best is None or (e.score > best if maximize else e.score < best)):
            best = e.score
        line.append(best)
    ax.step(range(len(history)), line, where="post", color="C1", label="best so far")
    if history[0].ok:
        ax.axhline(history[0].score, color="grey", ls="--", label="start (all 1.0)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("score (" + ("higher" if maximize else "lower") + " is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tune(
    config_file: str,
    out_dir: str,
    objective,
    settings: SearchSettings,
    *,
    identity_objective: dict,
    test_objective=None,
    cache: str = "auto",
    device: str = "cpu",
    write_model: bool = False,
    quiet: bool = False,
) -> SearchResult:
    """Run a whole tuning job (see the module docstring); return the search result."""
    merge_config, source = load_config(config_file)
    raw = yaml.safe_load(source)
    names = tuned_model_names(merge_config)
    identity = {
        "config_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "models": names,
        "objective": identity_objective,
        "settings": asdict(settings),
    }
    prepare_run_dir(out_dir, identity)  # refuse a different run before any heavy work

    dtype_name = merge_config.out_dtype or merge_config.dtype or "float32"
    dtype = getattr(torch, dtype_name)
    options = MergeOptions(quiet=True, device=device)
    cache_dir = _cache_dir(out_dir, cache, merge_config, len(names))
    linear: LinearMerge = capture_linear_merge(merge_config, options, cache_dir=cache_dir)

    from transformers import AutoTokenizer

    base_path = str(merge_config.base_model.model.path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if getattr(objective, "normalized", False):
        objective.set_reference(
            _reference_scores(objective, names, dtype, device, tokenizer, out_dir)
        )
    model = _load_model(base_path, dtype, device)
    linear.load_fixed(model)

    def evaluate(coefficients: Sequence[float], timings: dict) -> float:
        linear.apply(model, coefficients)
        began = time.perf_counter()
        try:
            return float(objective(model, tokenizer))
        finally:
            timings["objective"] = time.perf_counter() - began

    def on_improvement(evaluation: Evaluation) -> None:
        _write_atomic(
            os.path.join(out_dir, "best.yml"), best_config_yaml(raw, names, evaluation.coefficients)
        )

    result = run_search(
        evaluate,
        len(names),
        maximize=objective.maximize,
        out_dir=out_dir,
        identity=identity,
        settings=settings,
        on_improvement=on_improvement,
        quiet=quiet,
    )
    _plot(result.history, objective.maximize, os.path.join(out_dir, "scores.png"))

    summary = {
        "objective": identity_objective,
        "direction": "maximize" if objective.maximize else "minimize",
        "models": names,
        "evaluations": len(result.history),
        "failed": sum(not e.ok for e in result.history),
        "start": {"coefficients": result.start.coefficients, "score": result.start.score},
        "best": {
            "coefficients": result.best.coefficients,
            "score": result.best.score,
            "index": result.best.index,
        },
    }
    if test_objective is not None:
        for key, evaluation in (("start", result.start), ("best", result.best)):
            linear.apply(model, evaluation.coefficients)
            summary[key]["test_score"] = float(test_objective(model, tokenizer))
    _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if write_model:
        best_config, best_source = load_config(os.path.join(out_dir, "best.yml"))
        merge_into(
            best_config,
            os.path.join(out_dir, "merged"),
            MergeOptions(quiet=quiet, device=device),
            config_source=best_source,
        )
    return result


def _cache_dir(out_dir: str, cache: str, merge_config, n_models: int) -> str | None:
    disk = os.path.join(out_dir, "contributions-cache")
    if cache != "auto":
        return disk if cache == "disk" else None
    # Contributions are float32, n per parameter: keep them in RAM when they take at
    # most half of it. Shapes come from the safetensors headers, nothing is loaded.
    from glob import glob

    from safetensors import safe_open

    numel = 0
    for path in glob(os.path.join(str(merge_config.base_model.model.path), "*.safetensors")):
        with safe_open(path, framework="pt") as file:
            for key in file.keys():
                numel += math.prod(file.get_slice(key).get_shape())
    needed = 4 * n_models * numel
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        LOG.info("contributions need %.1f GiB: caching them on disk", needed / 2**30)
        return disk
    return None


def _reference_scores(objective, names, dtype, device, tokenizer, out_dir) -> list[list[float]]:
    """Per fine-tuned model, its score on every validation task (cached in OUT_DIR)."""
    path = os.path.join(out_dir, "reference_scores.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    scores = []
    for name in names:
        model = _load_model(name, dtype, device)
        scores.append(objective.scores(model, tokenizer))
        del model
    _write_atomic(path, json.dumps(scores) + "\n")
    return scores


@click.command("mergekit-pcb-tune")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--objective",
    "kind",
    type=click.Choice(["loss", "exact-match", "function", "lm-eval"]),
    default="loss",
    show_default=True,
    help="loss: lower is better; exact-match, lm-eval: higher is better; "
    "function: as --maximize/--minimize say",
)
@click.option(
    "--val",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="validation JSONL file, one per task (prompt/completion or text rows)",
)
@click.option(
    "--test",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="test JSONL file: scored for the start and the best only, never searched on",
)
@click.option(
    "--combine",
    type=click.Choice(["mean", "normalized"]),
    default="mean",
    show_default=True,
    help="normalized: each task divided by the best fine-tune's score",
)
@click.option("--function", help="pkg.module:function(model, tokenizer) -> float")
@click.option("--maximize/--minimize", default=None, help="direction of --function")
@click.option("--lm-eval-task", multiple=True, help="lm-evaluation-harness task (validation!)")
@click.option("--lm-eval-limit", type=int, default=None)
@click.option("--lower", type=float, default=0.5, show_default=True)
@click.option("--upper", type=float, default=3.0, show_default=True)
@click.option("--start", type=float, default=1.0, show_default=True)
@click.option("--sigma0", type=float, default=0.5, show_default=True)
@click.option("--popsize", type=int, default=None, help="default: 4 + 3 ln(n)")
@click.option(
    "--budget",
    type=int,
    default=100,
    show_default=True,
    help="evaluations, the starting point included",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--cache",
    type=click.Choice(["auto", "memory", "disk"]),
    default="auto",
    show_default=True,
    help="where the per-model contributions are kept",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--write-model", is_flag=True, help="also merge best.yml into OUT_DIR/merged")
@click.option("--quiet", is_flag=True)
def main(
    config_file,
    out_dir,
    kind,
    val,
    test,
    combine,
    function,
    maximize,
    lm_eval_task,
    lm_eval_limit,
    lower,
    upper,
    start,
    sigma0,
    popsize,
    budget,
    seed,
    cache,
    device,
    write_model,
    quiet,
) -> None:
    """Tune the per-model weights of the pcb config CONFIG_FILE; write results to OUT_DIR."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        settings = SearchSettings(lower, upper, start, sigma0, popsize, budget, seed)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    _check_apart(val, test)
    objective = build_objective(kind, val, combine, function, maximize, lm_eval_task, lm_eval_limit)
    if test and kind not in ("loss", "exact-match"):
        raise click.ClickException("--test files are scored with --objective loss or exact-match")
    # Test files are only reported (plain mean), for the start and the best candidate.
    test_objective = build_objective(kind, test, "mean", None, None, (), None) if test else None
    identity_objective = {
        "kind": kind,
        "combine": combine,
        "function": function,
        "maximize": maximize,
        "val": [{"path": p, "sha256": _sha256_file(p)} for p in val],
        "lm_eval_tasks": list(lm_eval_task),
    }
    try:
        result = tune(
            config_file,
            out_dir,
            objective,
            settings,
            identity_objective=identity_objective,
            test_objective=test_objective,
            cache=cache,
            device=device,
            write_model=write_model,
            quiet=quiet,
        )
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(str(error)) from error
    direction = "higher" if objective.maximize else "lower"
    click.echo(f"{objective.name} ({direction} is better) over {len(result.history)} evaluations")
    for label, e in (("start", result.start), ("best", result.best)):
        coefficients = ", ".join(f"{c:.4f}" for c in e.coefficients)
        click.echo(f"  {label:<5} score {e.score!s:<12} weights [{coefficients}]")
    click.echo(f"best config: {os.path.join(out_dir, 'best.yml')}")


if __name__ == "__main__":
    main()
