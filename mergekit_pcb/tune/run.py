"""A whole tuning job as a library call: :func:`tune`.

1. Read and check the config (a merge linear in the per-model weights:
   ``pcb``, ``task_arithmetic`` or ``linear``); refuse a different run in OUT_DIR
   before any heavy work.
2. Score every fine-tuned model alone when the objective is normalised by them
   (cached in ``reference_scores.json``).
3. Load the live model (the base) on its device(s), capture the config's
   contributions once (``capture.py``), placed beside the parameters they update
   while they fit (:func:`placement_for`), and copy in the tensors that do not depend
   on the weights.
4. Search (``search.py``): each candidate is written into the live model in place
   and scored by the objective.
5. Write the outputs: ``best.yml`` (as the search improves), ``history.jsonl``,
   ``run.json``, ``scores.png``, ``summary.json``, and with ``write_model`` the merged
   model written by mergekit from ``best.yml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import yaml
from mergekit.options import MergeOptions

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.merge import merge_into, read_config
from mergekit_pcb.tune.capture import capture_contributions, tuned_model_names
from mergekit_pcb.tune.contributions import Contributions, Placement, named_tensors
from mergekit_pcb.tune.objectives import Objective, ReferencedObjective
from mergekit_pcb.tune.search import (
    BatchEvaluator,
    Evaluation,
    SearchResult,
    SearchSettings,
    is_better,
    open_run,
    run_search,
    write_atomic,
)

LOG = logging.getLogger(__name__)

CACHE_DIR = "contributions-cache"
#: Share of a GPU's memory left free for the objective when placing contributions.
OBJECTIVE_ROOM = 0.25


def sha256_file(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def best_config_yaml(raw: dict, model_names: Sequence[str], weights: Sequence[float]) -> str:
    """The original config with each tuned model's ``weight`` set to its tuned value."""
    raw = copy.deepcopy(raw)
    by_name = dict(zip(model_names, weights, strict=True))
    for entry in raw["models"]:
        name = str(entry["model"])
        if name in by_name:
            entry["parameters"] = dict(entry.get("parameters") or {}, weight=float(by_name[name]))
    header = "# Written by mergekit-pcb-tune: the tuned merge. Run: mergekit-yaml best.yml OUT\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def resolve_device(device: str) -> str:
    """``auto``: the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str, dtype: torch.dtype, device: str, device_map: str | None = None):
    """A transformers causal LM on ``device`` (or spread by accelerate's ``device_map``)."""
    from transformers import AutoModelForCausalLM

    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as error:
            raise ConfigError("--device-map needs accelerate: pip install accelerate") from error
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


def free_memory(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes on ``device`` (for the CPU: half the RAM counts as free)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 2, total


def placement_for(
    mode: str,
    devices: Sequence[torch.device],
    memory: Callable[[torch.device], tuple[int, int]] = free_memory,
    objective_room: float = OBJECTIVE_ROOM,
) -> Placement:
    """A :class:`Placement` with a byte budget per device.

    A GPU's budget is its free memory less ``objective_room`` of its total, kept for
    the objective's activations; the CPU's is half its RAM.
    """
    budgets = {}
    for device in {torch.device(d) for d in [*devices, "cpu"]}:
        free, total = memory(device)
        room = 0 if device.type == "cpu" else int(objective_room * total)
        budgets[str(device)] = max(0, free - room)
        if device.type != "cpu":
            LOG.info(
                "%s: %.2f GiB free; contributions may take %.2f GiB of it, leaving %.2f GiB "
                "for the objective",
                device,
                free / 2**30,
                budgets[str(device)] / 2**30,
                (free - budgets[str(device)]) / 2**30,
            )
    return Placement(mode=mode, budgets=budgets)


@dataclass
class TuneResult:
    search: SearchResult
    contributions_bytes: int
    bytes_per_parameter_per_model: float
    placement: str

    @property
    def best(self) -> Evaluation:
        return self.search.best

    @property
    def start(self) -> Evaluation:
        return self.search.start

    @property
    def history(self) -> list[Evaluation]:
        return self.search.history


def tune(
    config_file: str,
    out_dir: str,
    objective: Objective,
    settings: SearchSettings | None = None,
    *,
    identity_objective: dict | None = None,
    test_objective: Objective | None = None,
    contributions: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    write_model: bool = False,
    quiet: bool = False,
    evaluator: Callable[[Contributions, Any, Any], BatchEvaluator] | None = None,
) -> TuneResult:
    """Run a whole tuning job (see the module docstring); return the result.

    ``contributions``: where they live (``auto``, ``device``, ``cpu``, ``disk``).
    ``evaluator``: builds a :class:`BatchEvaluator` from the contributions, the live
    model and the tokenizer (default: candidates one after another in this process).
    """
    settings = settings or SearchSettings()
    loaded = read_config(config_file)
    merge_config = loaded.merge_config
    names = tuned_model_names(merge_config)
    identity = {
        "config_sha256": hashlib.sha256(loaded.source.encode()).hexdigest(),
        "models": names,
        "objective": identity_objective or {"name": objective.name},
    }
    open_run(out_dir, identity, settings)  # refuse a different run or budget before heavy work

    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    dtype = getattr(torch, merge_config.out_dtype or merge_config.dtype or "float32")
    device = resolve_device(device)
    from transformers import AutoTokenizer

    base_path = str((merge_config.base_model or merge_config.models[0].model).model.path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if isinstance(objective, ReferencedObjective) and objective.normalized:
        objective.set_reference(
            _reference_scores(objective, names, dtype, device, tokenizer, out_dir)
        )

    model = load_model(base_path, dtype, device, device_map)
    params = named_tensors(model)
    placement = placement_for(contributions, sorted({str(p.device) for p in params.values()}))
    began = time.perf_counter()
    captured = capture_contributions(
        merge_config,
        MergeOptions(quiet=quiet, device=device if device_map is None else "cuda"),
        placement=placement,
        cache_dir=os.path.join(out_dir, CACHE_DIR),
        devices={name: p.device for name, p in params.items()},
    )
    LOG.info("captured the contributions in %.1f s", time.perf_counter() - began)
    captured.load_fixed(model)
    start = _start_weights(captured, settings)

    def on_improvement(evaluation: Evaluation) -> None:
        write_atomic(
            os.path.join(out_dir, "best.yml"),
            best_config_yaml(loaded.raw, names, evaluation.weights),
        )

    try:
        result = run_search(
            evaluator(captured, model, tokenizer)
            if evaluator
            else captured.scorer(model, tokenizer, objective),
            len(names),
            maximize=objective.maximize,
            out_dir=out_dir,
            identity=identity,
            settings=settings,
            start=start,
            model_names=names,
            on_improvement=on_improvement,
            quiet=quiet,
        )
        plot_scores(result.history, objective, os.path.join(out_dir, "scores.png"))
        summary = _summary(result, objective, names, captured)
        if test_objective is not None:
            for key, evaluation in (("start", result.start), ("best", result.best)):
                captured.apply(model, evaluation.weights)
                summary[key]["test_score"] = float(test_objective(model, tokenizer))
        write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(os.path.join(out_dir, CACHE_DIR), ignore_errors=True)
    if write_model:
        best = read_config(os.path.join(out_dir, "best.yml"))
        merge_into(
            best.merge_config,
            os.path.join(out_dir, "merged"),
            MergeOptions(quiet=quiet, device=device),
            config_source=best.source,
        )
    return TuneResult(
        result, captured.nbytes, captured.bytes_per_parameter_per_model, placement.describe()
    )


def _start_weights(captured: Contributions, settings: SearchSettings) -> list[float]:
    if settings.start is not None:
        return [settings.start] * captured.n_models
    pairs = zip(captured.model_names, captured.config_weights, strict=True)
    varying = [name for name, weight in pairs if weight is None]
    if varying:
        raise ConfigError(
            f"the weight of {', '.join(varying)} varies from tensor to tensor (a gradient or "
            "filters); the tuner searches one weight per model: give it a single number, "
            "or a common start with --start"
        )
    return [float(w) for w in captured.config_weights]


def _summary(
    result: SearchResult, objective: Objective, names: list[str], captured: Contributions
) -> dict[str, Any]:
    return {
        "objective": objective.name,
        "direction": "maximize" if objective.maximize else "minimize",
        "method": captured.method,
        "models": names,
        "evaluations": len(result.history),
        "resumed": result.resumed,
        "failed": sum(not e.ok for e in result.history),
        "start": {"weights": result.start.weights, "score": result.start.score},
        "best": {
            "weights": result.best.weights,
            "score": result.best.score,
            "index": result.best.index,
        },
        "on_bound": [asdict(hit) for hit in result.on_bound],
        "contributions": {
            "bytes": captured.nbytes,
            "bytes_per_parameter_per_model": captured.bytes_per_parameter_per_model,
            "stored_bytes_with_base": captured.stored_bytes,
            "placement": captured.placement.describe() if captured.placement else None,
        },
    }


def plot_scores(history: list[Evaluation], objective: Objective, path: str) -> None:
    """Score against evaluation, with the best so far and the starting point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in history if e.ok]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([e.index for e in ok], [e.score for e in ok], s=12, label="candidate")
    best, line = None, []
    for e in history:
        if e.ok and is_better(e.score, best, objective.maximize):
            best = e.score
        line.append(best)
    ax.step(range(len(history)), line, where="post", color="C1", label="best so far")
    if history[0].ok:
        start = ", ".join(f"{w:.3g}" for w in history[0].weights)
        ax.axhline(history[0].score, color="grey", ls="--", label=f"start ({start})")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(objective.name)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("score (" + ("higher" if objective.maximize else "lower") + " is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reference_scores(
    objective: ReferencedObjective,
    names: list[str],
    dtype: torch.dtype,
    device: str,
    tokenizer: Any,
    out_dir: str,
) -> list[list[float]]:
    """Per fine-tuned model, its score on every validation task (cached in OUT_DIR)."""
    path = os.path.join(out_dir, "reference_scores.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    scores = []
    for name in names:
        model = load_model(name, dtype, device)
        scores.append(objective.scores(model, tokenizer))
        del model
    write_atomic(path, json.dumps(scores) + "\n")
    return scores
