"""A whole tuning job as a library call: :func:`tune`, in five phases.

1. **Open** (:func:`_open_job`): read and check the config (a merge linear in the
   per-model weights: ``pcb``, ``task_arithmetic`` or ``linear``); open OUT_DIR,
   refusing a different run, or a budget that cannot run there, before any heavy work.
2. **Reference scores** (:func:`_set_reference_scores`): score every fine-tuned model
   alone when the objective is normalised by them (cached in ``reference_scores.json``).
3. **Live model** (:func:`_load_and_capture`): load the base on its device(s), capture
   the config's contributions once (``capture.py``), placed beside the parameters they
   update while they fit (``placement.py``), and copy in the tensors that do not
   depend on the weights.
4. **Search** (:func:`_search`, ``driver.py``): each candidate is written into the live
   model in place and scored by the objective; ``history.jsonl`` grows as it goes, and
   ``best.yml`` is rewritten as the search improves.
5. **Outputs** (:func:`_write_outputs`): ``scores.png``, ``summary.json`` (with the
   test scores of the start and the best), and with ``write_model`` the merged model
   written by mergekit from ``best.yml``.
"""

from __future__ import annotations

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
from mergekit.options import MergeOptions

from mergekit_pcb.config_check import RawConfig
from mergekit_pcb.merge import LoadedConfig, merge_into, parse_config, read_config
from mergekit_pcb.tune.capture import capture_contributions, tuned_model_names
from mergekit_pcb.tune.contributions import Contributions, named_tensors
from mergekit_pcb.tune.driver import open_search_run, run_search
from mergekit_pcb.tune.live_model import load_model, load_tokenizer, resolve_device
from mergekit_pcb.tune.objectives import Objective, ReferencedObjective, set_reference_scores
from mergekit_pcb.tune.outputs import EditEntry, config_yaml
from mergekit_pcb.tune.outputs import plot_scores as draw_scores
from mergekit_pcb.tune.placement import placement_for
from mergekit_pcb.tune.records import BatchEvaluator, Candidate, Evaluation
from mergekit_pcb.tune.run_dir import RunDirectory, write_atomic
from mergekit_pcb.tune.search import SearchResult, SearchSettings

LOG = logging.getLogger(__name__)

CACHE_DIR = "contributions-cache"

#: ``make_evaluator(contributions, live_model, tokenizer)``: how the candidates are scored.
MakeEvaluator = Callable[[Contributions, Any, Any], BatchEvaluator[Candidate, Evaluation]]


@dataclass
class TuneResult:
    search: SearchResult
    row_bytes: int  # the contributions stored, without the base
    bytes_per_parameter_per_model: float
    placement: str
    test_scores: dict[str, float]  # "start" and "best" on the test objective, if any

    @property
    def best(self) -> Evaluation:
        return self.search.best

    @property
    def start(self) -> Evaluation:
        return self.search.start

    @property
    def history(self) -> list[Evaluation]:
        return self.search.history


@dataclass
class _Job:
    """What the phases share: the run's config, directory (held open) and settings."""

    run: RunDirectory[Evaluation]
    config: LoadedConfig
    out_dir: str
    names: list[str]
    identity: dict[str, Any]
    settings: SearchSettings
    dtype: torch.dtype
    device: str
    base_path: str


def tune(
    config_file: str | RawConfig,
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
    make_evaluator: MakeEvaluator | None = None,
) -> TuneResult:
    """Run a whole tuning job (see the module docstring); return the result.

    ``config_file``: the config's path, or the config as ``read_raw_config`` read it.
    ``identity_objective``: what identifies the objective in ``run.json`` (default: its
    name). ``contributions``: where they live (``auto``, ``device``, ``cpu``, ``disk``).
    ``make_evaluator``: builds the :class:`~mergekit_pcb.tune.records.BatchEvaluator`
    from the contributions, the live model and the tokenizer (default: the candidates
    one after another in this process).
    """
    settings = settings or SearchSettings()
    job = _open_job(config_file, out_dir, settings, objective, identity_objective, device)
    try:
        return _run_job(
            job,
            objective,
            test_objective,
            contributions,
            device_map,
            write_model,
            quiet,
            make_evaluator,
        )
    finally:
        job.run.close()


def _run_job(
    job: _Job,
    objective: Objective,
    test_objective: Objective | None,
    contributions: str,
    device_map: str | None,
    write_model: bool,
    quiet: bool,
    make_evaluator: MakeEvaluator | None,
) -> TuneResult:
    """Phases 2-5, in the directory that phase 1 opened and holds."""
    out_dir = job.out_dir
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    tokenizer = load_tokenizer(job.base_path, "the tuner")
    if isinstance(objective, ReferencedObjective) and objective.normalized:
        _set_reference_scores(job, objective, tokenizer)
    model, captured = _load_and_capture(job, contributions, device_map, quiet)
    try:
        result = _search(job, objective, captured, model, tokenizer, make_evaluator, quiet)
        test_scores = _write_outputs(
            job, result, objective, test_objective, captured, model, tokenizer
        )
    finally:
        shutil.rmtree(os.path.join(out_dir, CACHE_DIR), ignore_errors=True)
    if write_model:
        best = read_config(os.path.join(out_dir, "best.yml"))
        merge_into(
            best.merge_config,
            os.path.join(out_dir, "merged"),
            MergeOptions(quiet=quiet, device=job.device),
            config_source=best.source,
        )
    return TuneResult(
        result,
        captured.row_bytes,
        captured.bytes_per_parameter_per_model,
        captured.placement.describe(),
        test_scores,
    )


def _open_job(
    config_file: str | RawConfig,
    out_dir: str,
    settings: SearchSettings,
    objective: Objective,
    identity_objective: dict | None,
    device: str,
) -> _Job:
    """Phase 1: the config read and checked, OUT_DIR opened (or refused) for the run."""
    config = (
        parse_config(config_file)
        if isinstance(config_file, RawConfig)
        else read_config(config_file)
    )
    merge_config = config.merge_config
    names = tuned_model_names(merge_config)
    identity = {
        "config_sha256": hashlib.sha256(config.source.encode()).hexdigest(),
        "models": names,
        "objective": identity_objective or {"name": objective.name},
    }
    base = merge_config.base_model or merge_config.models[0].model
    dtype = getattr(torch, merge_config.out_dtype or merge_config.dtype or "float32")
    device = resolve_device(device)
    return _Job(
        run=open_search_run(out_dir, identity, settings, len(names)),  # last: it locks
        config=config,
        out_dir=out_dir,
        names=names,
        identity=identity,
        settings=settings,
        dtype=dtype,
        device=device,
        base_path=str(base.model.path),
    )


def _set_reference_scores(job: _Job, objective: ReferencedObjective, tokenizer: Any) -> None:
    """Phase 2: per fine-tuned model, its score on every validation task (cached in
    OUT_DIR), given to the objective that normalises by them."""
    set_reference_scores(objective, job.out_dir, job.names, job.dtype, job.device, tokenizer)


def _load_and_capture(
    job: _Job, contributions: str, device_map: str | None, quiet: bool
) -> tuple[Any, Contributions]:
    """Phase 3: the live model, and the contributions captured and placed beside it."""
    model = load_model(job.base_path, job.dtype, job.device, device_map)
    params = named_tensors(model)
    placement = placement_for(contributions, sorted({str(p.device) for p in params.values()}))
    began = time.perf_counter()
    captured = capture_contributions(
        job.config.merge_config,
        MergeOptions(quiet=quiet, device=job.device if device_map is None else "cuda"),
        placement=placement,
        cache_dir=os.path.join(job.out_dir, CACHE_DIR),
        devices={name: p.device for name, p in params.items()},
    )
    LOG.info("captured the contributions in %.1f s", time.perf_counter() - began)
    captured.load_fixed(model)
    return model, captured


def _search(
    job: _Job,
    objective: Objective,
    captured: Contributions,
    model: Any,
    tokenizer: Any,
    make_evaluator: MakeEvaluator | None,
    quiet: bool,
) -> SearchResult:
    """Phase 4: the search, from the config's weights; ``best.yml`` as it improves."""

    def on_improvement(evaluation: Evaluation) -> None:
        write_atomic(
            os.path.join(job.out_dir, "best.yml"),
            best_config_yaml(job.config.raw, job.names, evaluation.weights),
        )

    return run_search(
        make_evaluator(captured, model, tokenizer)
        if make_evaluator
        else captured.scorer(model, tokenizer, objective),
        len(job.names),
        maximize=objective.maximize,
        out_dir=job.out_dir,
        identity=job.identity,
        settings=job.settings,
        start=captured.config_weights,
        model_names=job.names,
        on_improvement=on_improvement,
        quiet=quiet,
    )


def _write_outputs(
    job: _Job,
    result: SearchResult,
    objective: Objective,
    test_objective: Objective | None,
    captured: Contributions,
    model: Any,
    tokenizer: Any,
) -> dict[str, float]:
    """Phase 5: ``scores.png`` and ``summary.json``; the test scores of the start and best."""
    plot_scores(result.history, objective, os.path.join(job.out_dir, "scores.png"))
    summary = _summary(result, objective, job.names, captured)
    test_scores = {}
    if test_objective is not None:
        for key, evaluation in (("start", result.start), ("best", result.best)):
            captured.apply(model, evaluation.weights)
            test_scores[key] = summary[key]["test_score"] = float(test_objective(model, tokenizer))
    write_atomic(os.path.join(job.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return test_scores


def best_config_yaml(raw: dict, model_names: Sequence[str], weights: Sequence[float]) -> str:
    """The original config with each tuned model's ``weight`` set to its tuned value."""

    def set_weight(weight: float) -> EditEntry:
        def edit(entry: dict) -> None:
            entry["parameters"] = dict(entry.get("parameters") or {}, weight=weight)

        return edit

    edits = {name: set_weight(float(w)) for name, w in zip(model_names, weights, strict=True)}
    return config_yaml(
        raw, edits, "Written by mergekit-pcb-tune: the tuned merge. Run: mergekit-yaml best.yml OUT"
    )


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
            "bytes": captured.row_bytes,
            "bytes_per_parameter_per_model": captured.bytes_per_parameter_per_model,
            "stored_bytes_with_base": captured.stored_bytes,
            "placement": captured.placement.describe() if captured.placement else None,
        },
    }


def plot_scores(history: list[Evaluation], objective: Objective, path: str) -> None:
    """Score against evaluation, with the best so far and the starting point."""
    start = ", ".join(f"{w:.3g}" for w in history[0].weights) if history else ""
    draw_scores(
        [(e.index, e.score if e.ok else None) for e in history],
        maximize=objective.maximize,
        title=objective.name,
        path=path,
        start_label=f"start ({start})",
    )
