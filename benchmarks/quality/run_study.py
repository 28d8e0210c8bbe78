"""The merge-quality study: train a base and task experts, merge them, score, write the table.

One command rebuilds everything from nothing (or reuses the cached models):

    .venv/bin/python -m benchmarks.quality.run_study

1. Eight generated tasks (``quality_tasks``) with disjoint validation and test splits.
2. A small Llama trained from scratch on the mixture of all tasks (the base), and one
   expert per task fine-tuned from it at a low learning rate, replaying the base's
   mixture in half of each batch (``quality_models``);
   cached under ``--out`` and reused while their settings are unchanged.
3. For 2, 4 and all 8 tasks: every method of ``quality_merge`` with each setting of its
   grid, merged in memory (once per density, then scaled for each lambda) and scored
   on the validation split; the setting with the
   best mean normalised validation accuracy is merged again through ``run_merge`` (the
   ``mergekit-yaml`` path) and that model is scored on the test split. ``task_arithmetic``
   and ``pcb`` are also tuned from their grid's choice with ``mergekit-pcb-tune``'s
   default search and the same budget (one weight per model, validation objective;
   ``quality_tune``), and ``pcb``'s ablations are grid searched like ``pcb``.
4. ``RESULTS.md`` (the tables) and ``results.json`` (every number, the grids' scores
   included) are written; nothing else is read from anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import click
import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM

from benchmarks.quality.quality_eval import Score, normalized_mean, score_tasks
from benchmarks.quality.quality_evolve import evolver_rows, evolver_table
from benchmarks.quality.quality_merge import (
    ABLATIONS,
    DENSITIES,
    METHODS,
    RANDOM_SEED,
    MethodSpec,
    merge_in_memory,
    merge_with_mergekit,
    mergekit_config,
    scale_merge,
)
from benchmarks.quality.quality_models import ModelSettings, TrainSettings, build_models
from benchmarks.quality.quality_tasks import BASE_KEYS, KEYS, TASKS, Splits, make_splits
from benchmarks.quality.quality_tune import (
    FINER_SEARCHES,
    TUNED_METHODS,
    TUNER_SEED,
    FinerSearch,
    read_yaml_config,
    tune_weights,
    tuned_label,
)
from mergekit_pcb.synthetic import tiny_tokenizer

LOG = logging.getLogger("quality")

#: The finer searches run on the subsets of up to this many tasks: they cost about 1100
#: evaluations per subset, and an evaluation's cost grows with the tasks scored. Raising
#: it computes only the rows not yet in the row cache.
FINER_MAX_TASKS = 2

DATA_SEED = 0
TRAIN_SEED = 1
SUBSET_SEED = 2
TASK_NAMES = tuple(task.name for task in TASKS)
MODEL = ModelSettings()
EXPERT_STEPS = 400
EXPERT_LR = 2e-4
# Without replay an expert forgets much of the other tasks (``--expert-replay 0``: up
# to 32 points), and merged experts then undo each other; half-batches of the base's
# mixture keep the task vector to what the task needs.
EXPERT_REPLAY = 0.5


def base_training(seed: int) -> TrainSettings:
    return TrainSettings(
        tasks=TASK_NAMES,
        keys=BASE_KEYS,
        steps=2500,
        lr=3e-3,
        batch_size=64,
        seed=seed,
        warmup=100,
        cosine=True,
    )


def expert_training(
    task_index: int, task: str, base: TrainSettings, replay: float
) -> TrainSettings:
    return TrainSettings(
        tasks=(task,),
        keys=KEYS,
        steps=EXPERT_STEPS,
        lr=EXPERT_LR,
        batch_size=64,
        seed=base.seed + 100 + task_index,
        replay=replay,
        replay_tasks=base.tasks,
        replay_keys=base.keys,
    )


def subsets(per_size: int) -> list[tuple[str, ...]]:
    """Task subsets merged: ``per_size`` random pairs and quadruples, then all tasks."""
    rng = random.Random(SUBSET_SEED)
    chosen: list[tuple[str, ...]] = []
    for size in (2, 4):
        drawn: set[tuple[str, ...]] = set()
        while len(drawn) < per_size:
            drawn.add(tuple(sorted(rng.sample(TASK_NAMES, size), key=TASK_NAMES.index)))
        chosen += sorted(drawn)
    return [*chosen, TASK_NAMES]


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name].float() - b[name]).abs().max()) for name in b)


def _state(path: str) -> dict[str, torch.Tensor]:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _summary(scores: dict[str, Score], expert: dict[str, Score]) -> dict[str, Any]:
    return {
        "tasks": {t: asdict(s) for t, s in scores.items()},
        "mean_char_acc": statistics.mean(s.char_acc for s in scores.values()),
        "mean_exact": statistics.mean(s.exact for s in scores.values()),
        "normalized_char_acc": normalized_mean(scores, expert, "char_acc"),
        "normalized_exact": normalized_mean(scores, expert, "exact"),
    }


class Study:
    """The trained models, the live model that scores merges, and the reference scores."""

    def __init__(self, out_dir: str, splits: Splits, paths: dict[str, str]) -> None:
        self.out_dir = out_dir
        self.splits = splits
        self.paths = paths
        self.tokenizer = tiny_tokenizer()
        self.live = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        self.live.eval()
        self.base_state = _state(paths["base"])
        self.expert_states = {t: _state(paths[t]) for t in TASK_NAMES}
        self.base_scores = {
            split: self._score(self.live, split, TASK_NAMES) for split in ("val", "test")
        }
        # The base on the keys it trained on and on those only the experts saw.
        self.base_by_keys: dict[str, dict[str, Score]] = {}
        for part, wanted in (("trained", True), ("unseen", False)):
            data = {
                t: [e for e in splits.test[t] if (e.key in BASE_KEYS) == wanted] for t in TASK_NAMES
            }
            self.base_by_keys[part] = score_tasks(self.live, self.tokenizer, data, TASK_NAMES)
        # Each task's reference: its own expert on it.
        self.expert_scores: dict[str, dict[str, Score]] = {"val": {}, "test": {}}
        self.expert_all: dict[str, dict[str, dict[str, Score]]] = {}
        for task in TASK_NAMES:
            model = LlamaForCausalLM.from_pretrained(paths[task], dtype=torch.float32)
            self.expert_all[task] = {}
            for split in ("val", "test"):
                scores = self._score(model, split, TASK_NAMES)
                self.expert_all[task][split] = scores
                self.expert_scores[split][task] = scores[task]

    def _score(self, model, split: str, tasks: Sequence[str]) -> dict[str, Score]:
        data = self.splits.val if split == "val" else self.splits.test
        return score_tasks(model, self.tokenizer, data, tasks)

    def score_state(self, state: dict[str, torch.Tensor], split: str, tasks) -> dict[str, Score]:
        self.live.load_state_dict(state)
        return self._score(self.live, split, tasks)

    def grid_search(self, spec: MethodSpec, tasks: Sequence[str]) -> dict[str, Any]:
        """Every grid setting scored on validation; the best one by normalised accuracy.

        Also returns the best setting merged directly (``merged``), which checks the
        scaled grid and is the in-memory merge ``test_merge`` compares with ``run_merge``.
        """
        experts = {t: self.expert_states[t] for t in tasks}
        trials = []
        units = {}
        for density in spec.densities:
            units[density] = merge_in_memory(
                spec, {"density": density, "lambda": 1.0}, self.base_state, experts
            )
            for lam in spec.lambdas:
                merged = scale_merge(self.base_state, units[density], lam)
                scores = self.score_state(merged, "val", tasks)
                value = normalized_mean(scores, self.expert_scores["val"], "char_acc")
                setting = {"density": density, "lambda": lam}
                trials.append({"setting": setting, "val_normalized_char_acc": value})
        best = max(trials, key=lambda trial: trial["val_normalized_char_acc"])["setting"]
        scaled = scale_merge(self.base_state, units[best["density"]], best["lambda"])
        direct = merge_in_memory(spec, best, self.base_state, experts)
        return {
            "setting": best,
            "trials": trials,
            "merged": direct,
            "max_abs_diff_scaled_vs_direct": _max_abs_diff(scaled, direct),
        }

    def test_merge(
        self,
        spec: MethodSpec,
        setting: dict[str, float],
        tasks: Sequence[str],
        folder: str,
        weights: Sequence[float] | None = None,
        in_memory: dict[str, torch.Tensor] | None = None,
        config: dict[str, Any] | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Merge through ``run_merge`` and score the written model on both splits.

        ``config``: the mergekit config to merge (default: ``setting`` and ``weights``
        as one). ``in_memory`` is the same merge from ``merge_in_memory`` when the caller
        has it; for a deterministic method the two are compared, which for a given
        ``config`` checks that it is ``setting`` with ``weights``.
        """
        if config is None:
            config = mergekit_config(
                spec, setting, self.paths["base"], {t: self.paths[t] for t in tasks}, weights
            )
        out = os.path.join(self.out_dir, "merges", folder)
        merge_with_mergekit(config, out, spec.random)
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
        row = {
            "setting": setting,
            "config": out + ".yml",
            "val": _summary(self._score(model, "val", tasks), self.expert_scores["val"]),
            "test": _summary(self._score(model, "test", tasks), self.expert_scores["test"]),
        }
        if not spec.random and check:
            # The grid ran in memory: check it is the merge mergekit-yaml writes.
            if in_memory is None:
                experts = {t: self.expert_states[t] for t in tasks}
                in_memory = merge_in_memory(spec, setting, self.base_state, experts, weights)
            row["max_abs_diff_in_memory_vs_run_merge"] = _max_abs_diff(
                in_memory, model.state_dict()
            )
        return row

    def tuned_row(
        self,
        spec: MethodSpec,
        grid_row: dict[str, Any],
        tasks: Sequence[str],
        budget: int,
        finer: FinerSearch | None = None,
    ) -> dict[str, Any]:
        """The tuner's default search from ``grid_row``'s config (``finer``: a search of
        more numbers); its best.yml on test."""

        def objective(model, tokenizer) -> float:
            scores = score_tasks(model, tokenizer, self.splits.val, tasks)
            return normalized_mean(scores, self.expert_scores["val"], "char_acc")

        label = finer.label if finer else spec.label
        tuned = tune_weights(
            grid_row["config"],
            os.path.join(self.out_dir, "tune", _label_folder(tasks, label)),
            objective,
            budget,
            identity={"study": "quality", "method": label, "tasks": list(tasks)},
            layer_points=MODEL.num_hidden_layers if finer and finer.search == "per layer" else None,
            densities=DENSITIES if finer and finer.search == "densities" else (),
        )
        config = read_yaml_config(tuned["best_yml"])
        setting = dict(grid_row["setting"])
        if tuned["densities"]:
            setting["density"] = config["parameters"]["density"]
        row = self.test_merge(
            spec,
            setting,
            tasks,
            _label_folder(tasks, f"{label}_tuned"),
            tuned["weights"],
            config=config,
            # one weight per model: the config is the grid's setting with those weights
            check=not finer or finer.search != "per layer",
        )
        row["tuner"] = tuned
        # The tuner scored its candidates without mergekit; the same weights merged by
        # run_merge should score the same on validation.
        row["val_diff_run_merge_vs_tuner"] = (
            row["val"]["normalized_char_acc"] - tuned["val_objective_best"]
        )
        return row


def _label_folder(subset: Sequence[str], label: str) -> str:
    clean = label.replace(" ", "_").replace("/", "").replace("-", "_")
    return f"{len(subset)}_{'-'.join(subset)}/{clean}"


class RowCache:
    """Each finished row of the study as a JSON file under ``OUT/rows/``, reused by later runs.

    A row is reused only when it was computed with the same inputs (``key``: the subset,
    the row's label and the run's settings that change results), so that rows computed by
    separate runs (one group of rows at a time, or another seed's cache) combine into one
    ``RESULTS.md`` without recomputing the rest. ``--fresh`` ignores what is stored.
    """

    def __init__(self, out_dir: str, settings: dict[str, Any], fresh: bool) -> None:
        self.folder = os.path.join(out_dir, "rows")
        self.settings = settings
        self.fresh = fresh

    def _path(self, tasks: Sequence[str], label: str) -> str:
        return os.path.join(self.folder, _label_folder(tasks, label) + ".json")

    def _key(self, tasks: Sequence[str], label: str) -> dict[str, Any]:
        return {"tasks": list(tasks), "label": label, **self.settings}

    def stored(self, tasks: Sequence[str], label: str) -> dict[str, Any] | None:
        """The row stored for (tasks, label) with this run's inputs, if any."""
        path = self._path(tasks, label)
        if self.fresh or not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as file:
            stored = json.load(file)
        return stored["row"] if stored["key"] == self._key(tasks, label) else None

    def row(
        self, tasks: Sequence[str], label: str, compute: Callable[..., dict[str, Any]], *args: Any
    ) -> dict[str, Any]:
        """The stored row for (tasks, label), else ``compute(*args)``, stored, then returned."""
        stored = self.stored(tasks, label)
        if stored is not None:
            LOG.info("%d tasks %-26s reused from %s", len(tasks), label, self._path(tasks, label))
            return stored
        path = self._path(tasks, label)
        key = self._key(tasks, label)
        row = compute(*args)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".partial"
        with open(partial, "w", encoding="utf-8") as file:
            json.dump({"key": key, "row": row}, file, indent=2)
        os.replace(partial, path)
        return row


class _StoredOnly:
    """A :class:`RowCache` that gives the stored rows and None for the others (the study's
    ``--evolver-rows stored``: while another process computes them)."""

    def __init__(self, cache: RowCache) -> None:
        self.cache = cache

    def row(self, tasks: Sequence[str], label: str, *_: Any) -> dict[str, Any] | None:
        return self.cache.stored(tasks, label)


def run_subset(
    study: Study,
    cache: RowCache,
    tasks: tuple[str, ...],
    tuner_budget: int,
    compute_evolver: bool = True,
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for label, scores in (("base", study.base_scores), ("experts", study.expert_scores)):
        rows[label] = {
            split: _summary({t: scores[split][t] for t in tasks}, study.expert_scores[split])
            for split in ("val", "test")
        }
    specs = (*METHODS, *ABLATIONS)
    for spec in tqdm(specs, desc=f"{len(tasks)} tasks", leave=False):
        rows[spec.label] = cache.row(tasks, spec.label, grid_row, study, spec, tasks)
        row = rows[spec.label]
        LOG.info(
            "%d tasks %-26s %s  val %.3f  test %.3f (normalised char acc)",
            len(tasks),
            spec.label,
            row["setting"],
            row["val"]["normalized_char_acc"],
            row["test"]["normalized_char_acc"],
        )
    for spec in METHODS:
        if spec.label not in TUNED_METHODS:
            continue
        label = tuned_label(spec.label)
        row = cache.row(
            tasks,
            label,
            study.tuned_row,
            spec,
            rows[spec.label],
            tasks,
            tuner_budget,
        )
        rows[label] = row
        LOG.info(
            "%d tasks %-26s %s  val %.3f  test %.3f  (%d evaluations, %.0f s)",
            len(tasks),
            label,
            [round(c, 2) for c in row["tuner"]["weights"]],
            row["val"]["normalized_char_acc"],
            row["test"]["normalized_char_acc"],
            row["tuner"]["evaluations"],
            row["tuner"]["seconds"],
        )
    specs_by_label = {spec.label: spec for spec in METHODS}
    for finer in FINER_SEARCHES if len(tasks) <= FINER_MAX_TASKS else ():
        row = cache.row(
            tasks,
            finer.label,
            study.tuned_row,
            specs_by_label[finer.method],
            rows[finer.method],
            tasks,
            finer.budget,
            finer,
        )
        rows[finer.label] = row
        LOG.info(
            "%d tasks %-34s val %.3f  test %.3f  (%d evaluations, %.0f s)",
            len(tasks),
            finer.label,
            row["val"]["normalized_char_acc"],
            row["test"]["normalized_char_acc"],
            row["tuner"]["evaluations"],
            row["tuner"]["seconds"],
        )
    evolver_cache = cache if compute_evolver else _StoredOnly(cache)
    evolved = evolver_rows(
        study, evolver_cache, tasks, rows, tuner_budget, specs_by_label, _label_folder
    )
    evolved = {label: row for label, row in evolved.items() if row is not None}
    for label, row in evolved.items():
        LOG.info(
            "%d tasks %-34s val %.3f  test %.3f",
            len(tasks),
            label,
            row["val"]["normalized_char_acc"],
            row["test"]["normalized_char_acc"],
        )
    rows.update(evolved)
    return {"tasks": list(tasks), "rows": rows}


def grid_row(study: Study, spec: MethodSpec, tasks: tuple[str, ...]) -> dict[str, Any]:
    """A method's grid searched on validation, its best setting merged by run_merge and scored."""
    began = time.perf_counter()
    search = study.grid_search(spec, tasks)
    row = study.test_merge(
        spec,
        search["setting"],
        tasks,
        _label_folder(tasks, spec.label),
        in_memory=search["merged"],
    )
    row["grid"] = search["trials"]
    row["max_abs_diff_scaled_vs_direct"] = search["max_abs_diff_scaled_vs_direct"]
    row["seconds"] = time.perf_counter() - began
    return row


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _keys_text(keys: Sequence[int]) -> str:
    return f"{keys[0]}-{keys[-1]}"


def _setting_text(row: dict[str, Any]) -> str:
    if "setting" not in row:
        return ""
    setting = row["setting"]
    text = f"λ {setting['lambda']:g}"
    if setting["density"] != 1.0:
        text = f"density {setting['density']:g}, " + text
    if "tuner" in row:
        text += ", weights " + " ".join(f"{c:.2f}" for c in row["tuner"]["weights"])
    return text


def render_markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: every table from ``results``; no number is typed by hand."""
    s = results["settings"]
    lines = [
        "# Merge-quality study: results",
        "",
        f"Written by `{s['command']}` ({s['finished']}, {s['threads']} CPU threads, "
        f"{s['total_seconds'] / 60:.1f} min in all, training {s['training_seconds'] / 60:.1f} "
        "min of it; 0 when the models came from the cache). Method, grids and caveats: "
        "`benchmarks/quality/README.md`.",
        "",
        f"Model: Llama, hidden {s['model']['hidden_size']}, {s['model']['num_hidden_layers']} "
        f"layers, {s['parameters']:,} parameters, character tokenizer. Base: "
        f"{s['base_training']['steps']} steps on the mixture of all tasks, keys "
        f"{_keys_text(s['base_training']['keys'])} only; experts: {s['expert_steps']} steps at "
        f"lr {s['expert_lr']:g} on one task each, all keys {_keys_text(KEYS)}, "
        f"{s['expert_replay']:.0%} of each batch replaying the base's mixture. Validation "
        f"{s['n_val']} and test {s['n_test']} examples per task over all keys, disjoint, "
        "never trained on. "
        f"Seeds: data {s['data_seed']}, training {s['train_seed']}, subsets "
        f"{s['subset_seed']}, dare/della drops {s['random_seed']}, tuner {s['tuner_seed']}.",
        "",
        "Scores are test-split per-character accuracy of the answer (teacher-forced argmax), "
        "in %; *norm.* is the mean over tasks of merged / expert accuracy on that task; "
        "*exact* is whole-answer accuracy (what greedy decoding gets right). Every method's "
        "setting was chosen on the validation split.",
        "",
        "## Base and experts",
        "",
        "| model | " + " | ".join(TASK_NAMES) + " | mean |",
        "|---|" + "---:|" * (len(TASK_NAMES) + 1),
    ]
    reference = results["reference"]
    reference_rows = [
        ("base", reference["base"]["test"]),
        (
            f"base, keys {_keys_text(BASE_KEYS)} only (trained)",
            reference["base_by_keys"]["trained"],
        ),
        ("base, other keys only (unseen)", reference["base_by_keys"]["unseen"]),
    ]
    for label, scores in reference_rows:
        mean = statistics.mean(scores[t]["char_acc"] for t in TASK_NAMES)
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(scores[t]["char_acc"]) for t in TASK_NAMES)
            + f" | {_pct(mean)} |"
        )
    for expert in TASK_NAMES:
        scores = reference["experts"][expert]["test"]
        cells = [
            f"**{_pct(scores[t]['char_acc'])}**" if t == expert else _pct(scores[t]["char_acc"])
            for t in TASK_NAMES
        ]
        mean = statistics.mean(scores[t]["char_acc"] for t in TASK_NAMES)
        lines.append(f"| expert {expert} | " + " | ".join(cells) + f" | {_pct(mean)} |")
    lines += ["", "Bold: each expert on its own task, the denominator of *norm.*", ""]

    tuned_methods = [spec.label for spec in METHODS if spec.label in TUNED_METHODS]
    merged = [spec.label for spec in METHODS] + [tuned_label(m) for m in tuned_methods]
    merged += [spec.label for spec in ABLATIONS]
    lines += ["## Summary: normalised accuracy (test, %)", ""]
    header = [f"{len(sub['tasks'])}: {'+'.join(sub['tasks'])}" for sub in results["subsets"]]
    lines += [
        "| method | " + " | ".join(header) + " | mean |",
        "|---|" + "---:|" * (len(header) + 1),
    ]
    for label in ["base", *merged]:
        values = [sub["rows"][label]["test"]["normalized_char_acc"] for sub in results["subsets"]]
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(v) for v in values)
            + f" | {_pct(statistics.mean(values))} |"
        )
    lines.append("")
    lines += _tuned_tables(results, tuned_methods)
    lines += _finer_table(results, tuned_methods)
    lines += evolver_table(results, tuned_label)

    for sub in results["subsets"]:
        tasks = sub["tasks"]
        lines += [
            f"## {len(tasks)} tasks: {', '.join(tasks)}",
            "",
            "| method | setting (validation) | "
            + " | ".join(tasks)
            + " | mean | norm. | exact | norm. exact |",
            "|---|---|" + "---:|" * (len(tasks) + 4),
        ]
        for label in ["base", "experts", *merged]:
            row = sub["rows"][label]
            test = row["test"]
            lines.append(
                f"| {label} | {_setting_text(row)} | "
                + " | ".join(_pct(test["tasks"][t]["char_acc"]) for t in tasks)
                + f" | {_pct(test['mean_char_acc'])} | {_pct(test['normalized_char_acc'])}"
                f" | {_pct(test['mean_exact'])} | {_pct(test['normalized_exact'])} |"
            )
        lines.append("")

    def recorded(key: str) -> list[float]:
        return [
            row[key] for sub in results["subsets"] for row in sub["rows"].values() if key in row
        ]

    diffs = recorded("max_abs_diff_in_memory_vs_run_merge")
    scaled = recorded("max_abs_diff_scaled_vs_direct")
    tuner_diffs = recorded("val_diff_run_merge_vs_tuner")
    lines += [
        "## Checks",
        "",
        "- Each grid merged once per density at lambda 1 and scaled that merge's task "
        "vector for the other lambdas (every method here returns base + lambda * delta); "
        f"the chosen settings' scaled merges differ from direct merges by at most "
        f"{max(scaled):.2e} over {len(scaled)} merges.",
        f"- The validation grids merged in memory (`merge_state_dicts`); the reported models "
        f"were merged again by `run_merge`. For the deterministic methods the two agree to "
        f"max |difference| {max(diffs):.2e} over {len(diffs)} merges.",
        "- The tuned rows' models are the tuner's `best.yml` merged by `run_merge`; scored on "
        "validation they differ from the tuner's best score by at most "
        f"{max(abs(d) for d in tuner_diffs) * 100:.2g} points over {len(tuner_diffs)} searches "
        "(the tuner writes its candidates into the model without mergekit).",
        "",
    ]
    return "\n".join(lines)


def _bound_text(hit: dict[str, Any]) -> str:
    what = hit["what"] if hit["what"] == "common scale" else os.path.basename(hit["what"])
    return f"{what} {hit['value']:.2f} at {hit['side']} {hit['bound']:.2f}"


def _tuned_tables(results: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """The tuned rows against their grid rows, and what each search did."""
    subsets = results["subsets"]
    # Every search ran with the same settings (only the config differs): read them once.
    settings = subsets[0]["rows"][tuned_label(methods[0])]["tuner"]["search"]
    lines = [
        "## Tuned weights against the grid's choice (test, normalised %)",
        "",
        "Each tuned row starts from its method's chosen setting (weight 1 for every model) "
        "and runs `mergekit-pcb-tune`'s default search on the validation objective: the "
        f"start weights times a common scale on a log grid {settings['scale_min']:g} to "
        f"{settings['scale_max']:g}, then CMA-ES (seed {settings['seed']}) in the box "
        f"[{settings['lower_factor']:g}, {settings['upper_factor']:g}] x the best scaled "
        f"start; budget {settings['budget']} evaluations for every method and subset.",
        "",
        "| subset | " + " | ".join(f"{m} | {m} + tuned | gain" for m in methods) + " |",
        "|---|" + "---:|---:|---:|" * len(methods),
    ]
    columns: list[list[float]] = [[] for _ in range(3 * len(methods))]
    for sub in subsets:
        cells = []
        for m in methods:
            grid = sub["rows"][m]["test"]["normalized_char_acc"]
            tuned = sub["rows"][tuned_label(m)]["test"]["normalized_char_acc"]
            cells += [grid, tuned, tuned - grid]
        for column, value in zip(columns, cells, strict=True):
            column.append(value)
        lines.append(
            f"| {len(sub['tasks'])}: {'+'.join(sub['tasks'])} | "
            + " | ".join(_pct(v) for v in cells)
            + " |"
        )
    lines += [
        "| mean | " + " | ".join(_pct(statistics.mean(c)) for c in columns) + " |",
        "",
        "What each search did (validation normalised %: the start, the best common scale of "
        "it, the best found; the box edges a best weight lies within 10% of, log scale):",
        "",
        "| subset | method | start | best scale | best | scale | weights | evaluations "
        "| on the box's edge | seconds |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for sub in subsets:
        for m in methods:
            t = sub["rows"][tuned_label(m)]["tuner"]
            lines.append(
                f"| {len(sub['tasks'])}: {'+'.join(sub['tasks'])} | {m} "
                f"| {_pct(t['val_objective_start'])} | {_pct(t['val_objective_best_scale'])} "
                f"| {_pct(t['val_objective_best'])} | {t['best_scale']:.3g} "
                f"| {' '.join(f'{w:.2f}' for w in t['weights'])} | {t['evaluations']} "
                f"| {'; '.join(_bound_text(h) for h in t['on_bound']) or 'none'} "
                f"| {t['seconds']:.0f} |"
            )
    lines.append("")
    return lines


def _finer_table(results: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """The finer searches beside one weight per model, validation and test side by side."""
    subsets = [sub for sub in results["subsets"] if len(sub["tasks"]) <= FINER_MAX_TASKS]
    by_method = {m: [tuned_label(m)] for m in methods}
    for finer in FINER_SEARCHES:
        by_method[finer.method].append(finer.label)
    budget = results["settings"]["tuner_budget"]
    layers = results["settings"]["model"]["num_hidden_layers"]
    lines = [
        "## Finer searches: validation against test (normalised %)",
        "",
        f"From the same grid choice: `+ tuned weights` is one weight per model at budget "
        f"{budget}; `per model (200)` the same at 200 evaluations; `per layer` searches a "
        f"weight per layer and model (`--layer-points {layers}`, "
        "the embeddings and `lm_head` sharing layer 0's); `densities` runs the per-model "
        f"search at each density of the grid ({', '.join(f'{d:g}' for d in DENSITIES)}), "
        "a quarter of the budget each, and keeps the validation best. Each cell: "
        f"validation / test, on the subsets of up to {FINER_MAX_TASKS} tasks; *gap* is the "
        "mean validation minus the mean test.",
        "",
        "| method | search | "
        + " | ".join(f"{len(sub['tasks'])}: {'+'.join(sub['tasks'])}" for sub in subsets)
        + " | mean val | mean test | gap |",
        "|---|---|" + "---:|" * (len(subsets) + 3),
    ]
    for method in methods:
        for label in by_method[method]:
            val = [sub["rows"][label]["val"]["normalized_char_acc"] for sub in subsets]
            test = [sub["rows"][label]["test"]["normalized_char_acc"] for sub in subsets]
            search = label.removeprefix(method + " + ")
            lines.append(
                f"| {method} | {search} | "
                + " | ".join(f"{_pct(v)} / {_pct(t)}" for v, t in zip(val, test, strict=True))
                + f" | {_pct(statistics.mean(val))} | {_pct(statistics.mean(test))} "
                f"| {_pct(statistics.mean(val) - statistics.mean(test))} |"
            )
    lines.append("")
    return lines


@click.command()
@click.option(
    "--out",
    default="benchmarks/output/quality",
    show_default=True,
    help="models, merges and results.json (models are reused from here)",
)
@click.option("--results", "results_md", default="benchmarks/quality/RESULTS.md", show_default=True)
@click.option("--n-val", default=150, show_default=True)
@click.option("--n-test", default=600, show_default=True)
@click.option(
    "--subsets-per-size",
    default=2,
    show_default=True,
    help="how many random 2-task and 4-task subsets",
)
@click.option("--tuner-budget", default=60, show_default=True)
@click.option(
    "--train-seed",
    default=TRAIN_SEED,
    show_default=True,
    help="seed of the base's and experts' training (use another --out to keep both caches)",
)
@click.option(
    "--expert-replay",
    default=EXPERT_REPLAY,
    show_default=True,
    help="fraction of each expert batch drawn from the base's training mixture",
)
@click.option(
    "--evolver-rows",
    type=click.Choice(["compute", "stored"]),
    default="compute",
    show_default=True,
    help="stored: only the Evolver rows already in OUT/rows (another process computing them)",
)
@click.option("--train-only", is_flag=True, help="build (or reuse) the models and stop")
@click.option(
    "--fresh",
    is_flag=True,
    help="recompute every row (default: reuse a row stored under OUT/rows with the same inputs)",
)
def main(
    out: str,
    results_md: str,
    n_val: int,
    n_test: int,
    subsets_per_size: int,
    tuner_budget: int,
    train_seed: int,
    expert_replay: float,
    evolver_rows: str,
    train_only: bool,
    fresh: bool,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mergekit", "transformers", "mergekit_pcb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    began = time.perf_counter()
    torch.manual_seed(0)
    splits = make_splits(n_val, n_test, DATA_SEED)
    base = base_training(train_seed)
    experts = {
        task: expert_training(i, task, base, expert_replay) for i, task in enumerate(TASK_NAMES)
    }
    paths, train_seconds = build_models(os.path.join(out, "models"), MODEL, base, experts, splits)
    if train_only:
        return
    study = Study(out, splits, paths)
    LOG.info(
        "base mean char acc %.3f; experts on own task %.3f",
        statistics.mean(s.char_acc for s in study.base_scores["test"].values()),
        statistics.mean(s.char_acc for s in study.expert_scores["test"].values()),
    )
    results: dict[str, Any] = {
        "reference": {
            "base": {
                sp: {t: asdict(v) for t, v in sc.items()} for sp, sc in study.base_scores.items()
            },
            "expert_own": {
                sp: {t: asdict(v) for t, v in sc.items()} for sp, sc in study.expert_scores.items()
            },
            "experts": {
                e: {sp: {t: asdict(v) for t, v in sc.items()} for sp, sc in by_split.items()}
                for e, by_split in study.expert_all.items()
            },
            "base_by_keys": {
                part: {t: asdict(v) for t, v in sc.items()}
                for part, sc in study.base_by_keys.items()
            },
        },
        "subsets": [],
    }
    cache = RowCache(
        out,
        {
            "n_val": n_val,
            "n_test": n_test,
            "train_seed": train_seed,
            "expert_replay": expert_replay,
            "tuner_budget": tuner_budget,
        },
        fresh,
    )
    for tasks in subsets(subsets_per_size):
        results["subsets"].append(
            run_subset(study, cache, tasks, tuner_budget, evolver_rows == "compute")
        )
    results["settings"] = {
        "command": "python -m benchmarks.quality.run_study"
        + (f" {' '.join(sys.argv[1:])}" if sys.argv[1:] else ""),
        "finished": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - began,
        "training_seconds": sum(train_seconds.values()),
        "model": asdict(MODEL),
        "parameters": sum(p.numel() for p in study.live.parameters()),
        "base_training": asdict(base),
        "expert_steps": EXPERT_STEPS,
        "expert_lr": EXPERT_LR,
        "expert_replay": expert_replay,
        "n_val": n_val,
        "n_test": n_test,
        "data_seed": DATA_SEED,
        "train_seed": train_seed,
        "subset_seed": SUBSET_SEED,
        "random_seed": RANDOM_SEED,
        "tuner_seed": TUNER_SEED,
        "tuner_budget": tuner_budget,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    with open(results_md, "w", encoding="utf-8") as file:
        file.write(render_markdown(results))
    LOG.info(
        "wrote %s and %s in %.1f min",
        results_md,
        os.path.join(out, "results.json"),
        (time.perf_counter() - began) / 60,
    )


if __name__ == "__main__":
    main()
