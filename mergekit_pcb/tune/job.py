"""A whole tuning job as a library call: :func:`tune`, in five phases.

1. **Open** (:func:`_open_job`): read and check the config (a merge linear in the
   per-model weights: ``pcb``, ``task_arithmetic`` or ``linear``); open OUT_DIR,
   refusing a different run, or a budget that cannot run there, before any heavy work.
2. **Reference scores** (:func:`_set_reference_scores`): score every fine-tuned model
   alone when the objective is normalised by them (cached in ``reference_scores.json``).
3. **Live model** (:func:`_run_job`, :func:`_capture`): load the base on its device(s),
   capture the config's contributions once, or once per density with ``--densities``
   (``capture.py``), placed beside the parameters they
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_pcb.config_check import RawConfig
from mergekit_pcb.errors import ConfigError
from mergekit_pcb.merge import LoadedConfig, merge_into, parse_config, read_config
from mergekit_pcb.tune.capture import (
    capture_contributions,
    default_weight,
    plan_weights,
    tuned_model_names,
)
from mergekit_pcb.tune.contributions import Contributions, named_tensors
from mergekit_pcb.tune.densities import (
    check_config_for_densities,
    check_densities,
    config_at_density,
    density_dir,
    density_summary,
)
from mergekit_pcb.tune.driver import open_search_run, run_search
from mergekit_pcb.tune.live_model import load_model, load_tokenizer, resolve_device
from mergekit_pcb.tune.objectives import Objective, ReferencedObjective, set_reference_scores
from mergekit_pcb.tune.outputs import EditEntry, config_yaml
from mergekit_pcb.tune.outputs import plot_scores as draw_scores
from mergekit_pcb.tune.placement import placement_for
from mergekit_pcb.tune.records import BatchEvaluator, Candidate, Evaluation, is_better
from mergekit_pcb.tune.run_dir import RunDirectory, write_atomic
from mergekit_pcb.tune.search import SearchResult, SearchSettings
from mergekit_pcb.tune.weight_layout import WeightLayout, layout_for, search_space

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
    densities: list[dict[str, Any]] = field(default_factory=list)  # with --densities

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
    layout: WeightLayout  # the searched numbers (positions resolved before the capture)
    densities: list[float] = field(default_factory=list)  # --densities (empty: none)


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
    layer_points: int | None = None,
    module_groups: Sequence[str] = (),
    densities: Sequence[float] = (),
) -> TuneResult:
    """Run a whole tuning job (see the module docstring); return the result.

    ``config_file``: the config's path, or the config as ``read_raw_config`` read it.
    ``identity_objective``: what identifies the objective in ``run.json`` (default: its
    name). ``contributions``: where they live (``auto``, ``device``, ``cpu``, ``disk``).
    ``make_evaluator``: builds the :class:`~mergekit_pcb.tune.records.BatchEvaluator`
    from the contributions, the live model and the tokenizer (default: the candidates
    one after another in this process). ``layer_points``/``module_groups``: give each
    model's plain-number weight that structure to search (``weight_layout.py``).
    ``densities``: run the search at each ``pcb`` density (``densities.py``).
    """
    settings = settings or SearchSettings()
    job = _open_job(
        config_file,
        out_dir,
        settings,
        objective,
        identity_objective,
        device,
        search_space(layer_points, module_groups),
        check_densities(densities),
    )
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
    model = load_model(job.base_path, job.dtype, job.device, device_map)
    options = MergeOptions(quiet=quiet, device=job.device if device_map is None else "cuda")
    job.layout = job.layout.resolved(job.config.raw, lambda raw: plan_weights(raw, options))
    runs = [_at_density(job, d) for d in job.densities] or [job]
    overall: list[Evaluation] = []  # the best of every run so far (with --densities)

    def on_improvement(run: _Job, evaluation: Evaluation) -> None:
        if run is job:  # one search: its best.yml is OUT_DIR's
            return
        if not overall or is_better(evaluation.score, overall[0].score, objective.maximize):
            overall[:] = [evaluation]
            write_atomic(
                os.path.join(out_dir, "best.yml"),
                best_config_yaml(run.config.raw, job.layout, evaluation.weights),
            )

    outcomes = []
    for run in runs:
        captured = _capture(run, model, contributions, options)
        try:
            result = _search(
                run, objective, captured, model, tokenizer, make_evaluator, quiet, on_improvement
            )
            test_scores = _write_outputs(
                run, result, objective, test_objective, captured, model, tokenizer
            )
        finally:
            shutil.rmtree(os.path.join(run.out_dir, CACHE_DIR), ignore_errors=True)
        stored = (
            captured.row_bytes,
            captured.bytes_per_parameter_per_model,
            captured.placement.describe(),
        )
        outcomes.append((run, result, test_scores, stored))
        del captured  # one capture at a time: the next replaces it
    run, result, test_scores, stored = _best_outcome(outcomes, objective)
    densities = [
        density_summary(d, o[1], o[2]) for d, o in zip(job.densities, outcomes, strict=False)
    ]
    if densities:
        _write_density_outputs(job, run, result, objective, densities)
    if write_model:
        best = read_config(os.path.join(out_dir, "best.yml"))
        merge_into(
            best.merge_config,
            os.path.join(out_dir, "merged"),
            MergeOptions(quiet=quiet, device=job.device),
            config_source=best.source,
        )
    return TuneResult(result, *stored, test_scores, densities)


def _best_outcome(outcomes: list, objective: Objective) -> tuple:
    """The run whose best scores best on validation (the first, on a tie)."""
    best = outcomes[0]
    for outcome in outcomes[1:]:
        if is_better(outcome[1].best.score, best[1].best.score, objective.maximize):
            best = outcome
    return best


def _at_density(job: _Job, density: float) -> _Job:
    """The search at one density: its config, its own directory, a share of the budget."""
    raw = config_at_density(job.config.raw, density)
    config = LoadedConfig(
        job.config.path, job.config.source, raw, MergeConfiguration.model_validate(raw)
    )
    return replace(
        job,
        config=config,
        out_dir=density_dir(job.out_dir, density),
        identity={**job.identity, "density": density},
        settings=_per_run(job.settings, job.densities),
        densities=[],
    )


def _per_run(settings: SearchSettings, densities: Sequence[float]) -> SearchSettings:
    """The settings of one search: with densities, an equal share of the budget each."""
    if not densities:
        return settings
    return replace(settings, budget=max(1, settings.budget // len(densities)))


def _write_density_outputs(
    job: _Job, run: _Job, result: SearchResult, objective: Objective, densities: list[dict]
) -> None:
    """OUT_DIR's own outputs with --densities: the best density's config, plot and
    summary, the summary listing every density's best."""
    write_atomic(
        os.path.join(job.out_dir, "best.yml"),
        best_config_yaml(run.config.raw, job.layout, result.best.weights),
    )
    shutil.copyfile(
        os.path.join(run.out_dir, "scores.png"), os.path.join(job.out_dir, "scores.png")
    )
    with open(os.path.join(run.out_dir, "summary.json"), encoding="utf-8") as file:
        summary = json.load(file)
    summary["best"]["density"] = run.identity["density"]
    summary["densities"] = densities
    summary["evaluations"] = sum(d["evaluations"] for d in densities)
    write_atomic(os.path.join(job.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    for entry in densities:
        LOG.info(
            "density %g: best %s %.6g over %d evaluations",
            entry["density"],
            objective.name,
            entry["best_score"],
            entry["evaluations"],
        )


def _open_job(
    config_file: str | RawConfig,
    out_dir: str,
    settings: SearchSettings,
    objective: Objective,
    identity_objective: dict | None,
    device: str,
    space: dict[str, Any],
    densities: list[float],
) -> _Job:
    """Phase 1: the config read and checked, OUT_DIR opened (or refused) for the run."""
    config = (
        parse_config(config_file)
        if isinstance(config_file, RawConfig)
        else read_config(config_file)
    )
    merge_config = config.merge_config
    names = tuned_model_names(merge_config)
    try:
        layout = layout_for(
            config.raw, names, default=default_weight(merge_config.merge_method), **space
        )
    except ConfigError as error:
        raise ConfigError(f"{config.path}: {error}") from None
    if densities:
        try:
            check_config_for_densities(config.raw, names)
        except ConfigError as error:
            raise ConfigError(f"{config.path}: {error}") from None
        space = {**space, "densities": densities}
    identity = {
        "config_sha256": hashlib.sha256(config.source.encode()).hexdigest(),
        "models": names,
        "objective": identity_objective or {"name": objective.name},
        **({"search_space": space} if any(space.values()) else {}),
    }
    base = merge_config.base_model or merge_config.models[0].model
    dtype = getattr(torch, merge_config.out_dtype or merge_config.dtype or "float32")
    device = resolve_device(device)
    per_run = _per_run(settings, densities)
    try:
        run = open_search_run(out_dir, identity, per_run, layout.size)  # last: it locks
    except ValueError as error:
        if not densities:
            raise
        raise ValueError(
            f"--budget {settings.budget} over {len(densities)} densities leaves "
            f"{per_run.budget} for each: {error}"
        ) from None
    return _Job(
        run=run,
        config=config,
        out_dir=out_dir,
        names=names,
        identity=identity,
        settings=settings,
        dtype=dtype,
        device=device,
        base_path=str(base.model.path),
        layout=layout,
        densities=densities,
    )


def _set_reference_scores(job: _Job, objective: ReferencedObjective, tokenizer: Any) -> None:
    """Phase 2: per fine-tuned model, its score on every validation task (cached in
    OUT_DIR), given to the objective that normalises by them."""
    set_reference_scores(objective, job.out_dir, job.names, job.dtype, job.device, tokenizer)


def _capture(job: _Job, model: Any, contributions: str, options: MergeOptions) -> Contributions:
    """Phase 3: the contributions captured and placed beside the live model's parameters."""
    params = named_tensors(model)
    placement = placement_for(contributions, sorted({str(p.device) for p in params.values()}))
    began = time.perf_counter()
    captured = capture_contributions(
        job.config.merge_config,
        options,
        placement=placement,
        cache_dir=os.path.join(job.out_dir, CACHE_DIR),
        devices={name: p.device for name, p in params.items()},
        layout=job.layout,
    )
    LOG.info("captured the contributions in %.1f s", time.perf_counter() - began)
    captured.load_fixed(model)
    return captured


def _search(
    job: _Job,
    objective: Objective,
    captured: Contributions,
    model: Any,
    tokenizer: Any,
    make_evaluator: MakeEvaluator | None,
    quiet: bool,
    also_on_improvement: Callable[[_Job, Evaluation], None],
) -> SearchResult:
    """Phase 4: the search, from the config's weights; ``best.yml`` as it improves."""

    def on_improvement(evaluation: Evaluation) -> None:
        write_atomic(
            os.path.join(job.out_dir, "best.yml"),
            best_config_yaml(job.config.raw, job.layout, evaluation.weights),
        )
        also_on_improvement(job, evaluation)

    return run_search(
        make_evaluator(captured, model, tokenizer)
        if make_evaluator
        else captured.scorer(model, tokenizer, objective),
        job.layout.size,
        maximize=objective.maximize,
        out_dir=job.out_dir,
        identity=job.identity,
        settings=job.settings,
        start=job.layout.start,
        model_names=job.layout.labels,
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


def best_config_yaml(raw: dict, layout: WeightLayout, numbers: Sequence[float]) -> str:
    """The original config with each tuned model's ``weight`` setting holding its tuned
    numbers (in the setting's own structure)."""

    def set_weight(setting: Any) -> EditEntry:
        def edit(entry: dict) -> None:
            entry["parameters"] = dict(entry.get("parameters") or {}, weight=setting)

        return edit

    settings = zip(layout.model_names, layout.settings_with(numbers), strict=True)
    return config_yaml(
        raw,
        {name: set_weight(setting) for name, setting in settings},
        "Written by mergekit-pcb-tune: the tuned merge. Run: mergekit-yaml best.yml OUT",
    )


def _summary(
    result: SearchResult, objective: Objective, names: list[str], captured: Contributions
) -> dict[str, Any]:
    return {
        "objective": objective.name,
        "direction": "maximize" if objective.maximize else "minimize",
        "method": captured.method,
        "models": names,
        "numbers": captured.layout.labels,
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
