"""The study's Evolver rows: ``mergekit-pcb-evolve`` from a grid's choice, and evolve-then-tune.

* ``evolver + pcb`` and ``evolver + task_arithmetic``: the Evolver library
  (:func:`mergekit_pcb.evolve.job.evolve`, ``merged`` mode, its default ``f`` and ``cr``)
  on the config the method's grid chose, at the tuned rows' budget (the start included),
  against the tuned rows' objective (validation normalised per-character accuracy). The
  model scored is the command's ``best.yml`` (the config over the evolved experts)
  merged by ``run_merge``.
* ``evolver + pcb, then tuned weights``: the tuner's default search on that evolved
  ``best.yml``, another budget; beside it ``pcb + tuned per model (2 x budget)``, the
  tuner alone from the grid's choice at the same total number of evaluations.

Each row is computed once and cached by the study's row cache like the others.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import click
import torch

from benchmarks.quality.quality_eval import normalized_mean, score_tasks
from benchmarks.quality.quality_tune import FinerSearch, read_yaml_config, tune_weights
from mergekit_pcb.config_check import read_raw_config
from mergekit_pcb.evolve.job import evolve
from mergekit_pcb.evolve.settings import EvolveSettings
from mergekit_pcb.tune.objectives import UserObjective

LOG = logging.getLogger("quality")

EVOLVER_SEED = 1
#: The grid rows given an Evolver row: the method the package is about, and the plain sum.
EVOLVED_METHODS = ("pcb", "task_arithmetic")
#: The method whose evolved population is then tuned.
EVOLVED_THEN_TUNED = "pcb"

#: ``label_folder(tasks, label)``: a row's folder name (the study's own function).
LabelFolder = Callable[[Sequence[str], str], str]


def evolver_label(method: str) -> str:
    return f"evolver + {method}"


def evolved_tuned_label(method: str) -> str:
    return f"evolver + {method}, then tuned weights"


def tuned_twice_search(method: str, budget: int) -> FinerSearch:
    """The tuner alone at the evolve-then-tune row's total budget."""
    return FinerSearch(method, "per model", 2 * budget)


def _objective(study: Any, tasks: Sequence[str]) -> Callable[[Any, Any], float]:
    def objective(model: Any, tokenizer: Any) -> float:
        scores = score_tasks(model, tokenizer, study.splits.val, tasks)
        return normalized_mean(scores, study.expert_scores["val"], "char_acc")

    return objective


def evolve_population(
    config_file: str,
    evolve_dir: str,
    objective: Callable[[Any, Any], float],
    budget: int,
    n_models: int,
    identity: dict[str, Any],
    seed: int = EVOLVER_SEED,
) -> dict[str, Any]:
    """Evolve the experts of ``config_file`` for ``budget`` evaluations, maximising
    ``objective``; what the study records of the run, and the path of ``best.yml``."""
    # The grid may have chosen another config since the last run: start over.
    shutil.rmtree(evolve_dir, ignore_errors=True)
    settings = EvolveSettings(
        generations=math.ceil((budget - 1) / n_models), seed=seed, budget=budget
    )
    began = time.perf_counter()
    result = evolve(
        read_raw_config(config_file, strict=True),
        evolve_dir,
        UserObjective(objective, True, "validation normalised per-character accuracy"),
        settings,
        identity_objective=identity,
        device="cpu",
        quiet=True,
    )
    summary = result.summary
    return {
        "val_objective_start": result.start_score,
        "val_objective_result": result.result_score,
        "evaluations": len(result.history),
        "accepted": sum(r.accepted for r in result.history),
        "acceptances": summary["acceptances"],
        "failed": summary["failed"],
        "seconds": time.perf_counter() - began,
        "settings": asdict(settings),
        "best_yml": os.path.join(evolve_dir, "best.yml"),
    }


def evolver_row(
    study: Any,
    spec: Any,
    grid_row: dict[str, Any],
    tasks: Sequence[str],
    budget: int,
    label_folder: LabelFolder,
) -> dict[str, Any]:
    """The Evolver from ``grid_row``'s config; its ``best.yml`` merged by run_merge, scored."""
    label = evolver_label(spec.label)
    evolved = evolve_population(
        grid_row["config"],
        # No '+' in the folder: mergekit reads 'path+lora' in best.yml's model paths.
        os.path.join(study.out_dir, "evolve", label_folder(tasks, spec.label)),
        _objective(study, tasks),
        budget,
        len(tasks),
        identity={"study": "quality", "method": label, "tasks": list(tasks)},
    )
    row = study.test_merge(
        spec,
        grid_row["setting"],
        tasks,
        label_folder(tasks, label),
        config=read_yaml_config(evolved["best_yml"]),
        check=False,  # the experts changed: the grid's in-memory merge is not this one
    )
    row["evolver"] = evolved
    # The Evolver scored its merges in memory; run_merge of best.yml should score the same.
    row["val_diff_run_merge_vs_evolver"] = (
        row["val"]["normalized_char_acc"] - evolved["val_objective_result"]
    )
    return row


def evolved_tuned_row(
    study: Any,
    spec: Any,
    evolved: dict[str, Any],
    tasks: Sequence[str],
    budget: int,
    label_folder: LabelFolder,
) -> dict[str, Any]:
    """The tuner's default search on the evolved ``best.yml`` of ``evolved`` (a row of
    :func:`evolver_row`); the tuned config merged by run_merge, scored."""
    label = evolved_tuned_label(spec.label)
    tuned = tune_weights(
        evolved["evolver"]["best_yml"],
        os.path.join(study.out_dir, "tune", label_folder(tasks, label)),
        _objective(study, tasks),
        budget,
        identity={"study": "quality", "method": label, "tasks": list(tasks)},
    )
    row = study.test_merge(
        spec,
        evolved["setting"],
        tasks,
        label_folder(tasks, label),
        tuned["weights"],
        config=read_yaml_config(tuned["best_yml"]),
        check=False,
    )
    row["evolver"] = evolved["evolver"]
    row["tuner"] = tuned
    return row


def evolver_rows(
    study: Any,
    cache: Any,
    tasks: tuple[str, ...],
    rows: dict[str, Any],
    budget: int,
    specs: dict[str, Any],
    label_folder: LabelFolder,
) -> dict[str, Any]:
    """Every Evolver row of one subset (computed, or reused from ``cache``)."""
    out: dict[str, Any] = {}
    for method in EVOLVED_METHODS:
        label = evolver_label(method)
        out[label] = cache.row(
            tasks,
            label,
            evolver_row,
            study,
            specs[method],
            rows[method],
            tasks,
            budget,
            label_folder,
        )
    method = EVOLVED_THEN_TUNED
    label = evolved_tuned_label(method)
    out[label] = cache.row(
        tasks,
        label,
        evolved_tuned_row,
        study,
        specs[method],
        out[evolver_label(method)],
        tasks,
        budget,
        label_folder,
    )
    finer = tuned_twice_search(method, budget)
    out[finer.label] = cache.row(
        tasks,
        finer.label,
        study.tuned_row,
        specs[method],
        rows[method],
        tasks,
        finer.budget,
        finer,
    )
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def evolver_table(results: dict[str, Any], tuned_label: Callable[[str], str]) -> list[str]:
    """The Evolver rows beside their grid and tuned rows, validation / test per subset."""
    subsets = results["subsets"]
    budget = results["settings"]["tuner_budget"]
    method = EVOLVED_THEN_TUNED
    labels = []
    for m in EVOLVED_METHODS:
        labels += [m, tuned_label(m), evolver_label(m)]
    labels += [evolved_tuned_label(method), tuned_twice_search(method, budget).label]
    if any(label not in sub["rows"] for sub in subsets for label in labels):
        return []
    lines = [
        "## Evolver: validation against test (normalised %)",
        "",
        f"From the same grid choice: `+ tuned weights` is the tuner at budget {budget}; "
        f"`evolver + ...` is `mergekit-pcb-evolve` (merged mode, f 0.5, cr 0.5, seed "
        f"{EVOLVER_SEED}) at the same budget; `evolver + {method}, then tuned weights` tunes "
        f"the evolved population's weights ({budget} + {budget} evaluations), beside the "
        f"tuner alone at {2 * budget}. Each cell: validation / test.",
        "",
        "| row | "
        + " | ".join(f"{len(s['tasks'])}: {'+'.join(s['tasks'])}" for s in subsets)
        + " | mean val | mean test | kept |",
        "|---|" + "---:|" * (len(subsets) + 3),
    ]
    for label in labels:
        val = [sub["rows"][label]["val"]["normalized_char_acc"] for sub in subsets]
        test = [sub["rows"][label]["test"]["normalized_char_acc"] for sub in subsets]
        evolved = [sub["rows"][label].get("evolver") for sub in subsets]
        kept = "/".join(str(e["accepted"]) for e in evolved) if all(evolved) else ""
        lines.append(
            f"| {label} | "
            + " | ".join(f"{_pct(v)} / {_pct(t)}" for v, t in zip(val, test, strict=True))
            + f" | {_pct(statistics.mean(val))} | {_pct(statistics.mean(test))} | {kept} |"
        )
    diffs = [
        abs(sub["rows"][evolver_label(m)]["val_diff_run_merge_vs_evolver"])
        for sub in subsets
        for m in EVOLVED_METHODS
    ]
    lines += [
        "",
        "`kept`: offspring kept per subset (of the budget's evaluations, the start included). "
        "The evolved `best.yml` merged by `run_merge` scores on validation what the Evolver's "
        f"in-memory merge scored, within {max(diffs):.1e} over {len(diffs)} rows.",
        "",
    ]
    return lines


@click.command()
@click.option("--out", required=True, help="the study's folder (its models and row cache)")
@click.option("--train-seed", default=1, show_default=True)
@click.option("--n-val", default=150, show_default=True)
@click.option("--n-test", default=600, show_default=True)
@click.option("--subsets-per-size", default=2, show_default=True)
@click.option("--tuner-budget", default=60, show_default=True)
@click.option("--expert-replay", default=0.5, show_default=True)
def main(
    out: str,
    train_seed: int,
    n_val: int,
    n_test: int,
    subsets_per_size: int,
    tuner_budget: int,
    expert_replay: float,
) -> None:
    """Compute (or reuse) only the Evolver rows and the rows they start from, in the study's
    row cache; ``run_study`` with the same settings then writes them into RESULTS.md."""
    from benchmarks.quality import run_study as study_module

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mergekit", "transformers", "mergekit_pcb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)  # as run_study does before it builds anything
    splits = study_module.make_splits(n_val, n_test, study_module.DATA_SEED)
    base = study_module.base_training(train_seed)
    experts = {
        task: study_module.expert_training(i, task, base, expert_replay)
        for i, task in enumerate(study_module.TASK_NAMES)
    }
    paths, _ = study_module.build_models(
        os.path.join(out, "models"), study_module.MODEL, base, experts, splits
    )
    study = study_module.Study(out, splits, paths)
    cache = study_module.RowCache(
        out,
        {
            "n_val": n_val,
            "n_test": n_test,
            "train_seed": train_seed,
            "expert_replay": expert_replay,
            "tuner_budget": tuner_budget,
        },
        fresh=False,
    )
    specs = {spec.label: spec for spec in study_module.METHODS}
    for tasks in study_module.subsets(subsets_per_size):
        rows = {
            m: cache.row(tasks, m, study_module.grid_row, study, specs[m], tasks)
            for m in EVOLVED_METHODS
        }
        done = evolver_rows(
            study, cache, tasks, rows, tuner_budget, specs, study_module._label_folder
        )
        for label, row in done.items():
            LOG.info(
                "%d tasks %-40s val %.3f  test %.3f",
                len(tasks),
                label,
                row["val"]["normalized_char_acc"],
                row["test"]["normalized_char_acc"],
            )


if __name__ == "__main__":
    main()
