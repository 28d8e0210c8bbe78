"""A whole evolution as a library call: :func:`evolve`, in four phases.

1. **Open** (:func:`open_job`): read and check the config (a ``models:`` list of at
   least two fine-tunes besides the base, parameters the method declares, a merge the
   evolver can reproduce) and the settings; open OUT_DIR (``tune/run_dir.py``),
   refusing a different run, before any model is read.
2. **Live model and population** (:func:`_load`): the base's tokenizer, the live model
   (the base, loaded by transformers), the individuals placed by the tuner's rule (GPU,
   else CPU memory, else disk; ``population.py``) and the config's merge planned once
   (``population_merge.py``); the tensors that do not depend on the population are
   written into the live model once.
3. **Evolution** (:func:`_run`): each candidate the :class:`~.evolver.Evolution` asks
   for is replayed from ``history.jsonl`` when the directory holds it (its offspring
   remade only when it was accepted), else made, merged into the live model in place
   and scored; its row is appended as it ends. An offspring is a function of
   (seed, generation, individual, tensor), so a resumed run evolves the population a
   straight run does, bit for bit.
4. **Outputs** (:func:`_write_outputs`): ``population/<name>/`` (every individual as a
   model folder), ``best.yml`` (the config over them), ``scores.png``, ``summary.json``
   (start and result, their test scores, acceptances, where the population lived);
   with ``write_model`` the result in ``merged/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.options import MergeOptions
from tqdm import tqdm

from mergekit_pcb.config_check import RawConfig, check_parameter_keys
from mergekit_pcb.console import bars_disabled
from mergekit_pcb.errors import ConfigError
from mergekit_pcb.evolve.evolver import Candidate, Evolution
from mergekit_pcb.evolve.population import ModelTensors, Population, individual_refs
from mergekit_pcb.evolve.population_merge import (
    PopulationMerge,
    check_config,
    draws_random_masks,
)
from mergekit_pcb.evolve.records import EvolveRecord, Scored
from mergekit_pcb.evolve.settings import EvolveSettings
from mergekit_pcb.merge import LoadedConfig, merge_into, parse_config, read_config
from mergekit_pcb.tune.live_model import load_model, load_tokenizer, resolve_device
from mergekit_pcb.tune.objectives import Objective, ReferencedObjective, set_reference_scores
from mergekit_pcb.tune.outputs import config_yaml, plot_scores
from mergekit_pcb.tune.placement import placement_for
from mergekit_pcb.tune.records import best_of, evaluate_candidate
from mergekit_pcb.tune.run_dir import HISTORY_FILE, RunDirectory, RunMismatchError, write_atomic
from mergekit_pcb.tune.search import AllCandidatesFailedError

LOG = logging.getLogger(__name__)

#: Individuals placed on disk that have changed live here during a run (removed after).
CACHE_DIR = "population-cache"
POPULATION_DIR = "population"


@dataclass
class EvolveResult:
    """What a run gives back (``summary.json`` holds the same)."""

    history: list[EvolveRecord]
    start_score: float | None
    result_score: float | None
    test_scores: dict[str, float]  # "start" and "result" on the test objective, if any
    best_individual: str | None  # individual mode: the result's name
    resumed: int
    folders: dict[str, str]  # individual's name -> its folder under population/
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvolveJob:
    """What the phases share: the config, the open run directory, the settings."""

    run: RunDirectory[EvolveRecord]
    config: LoadedConfig
    out_dir: str
    settings: EvolveSettings
    options: MergeOptions
    names: list[str]  # each individual's model reference, as the config writes it
    folder_names: list[str]  # ... and its folder's name under population/
    dtype: torch.dtype
    device: str
    base_path: str
    random_masks: bool


def evolve(
    raw_config: RawConfig,
    out_dir: str,
    objective: Objective,
    settings: EvolveSettings | None = None,
    *,
    identity_objective: dict | None = None,
    test_objective: Objective | None = None,
    population: str = "auto",
    device: str = "auto",
    write_model: bool = False,
    quiet: bool = False,
) -> EvolveResult:
    """Run a whole evolution (see the module docstring); return the result.

    ``raw_config``: the config as ``read_raw_config`` read it. ``identity_objective``:
    what identifies the objective in ``run.json`` (default: its name). ``population``:
    where the individuals live (``auto``, ``device``, ``cpu``, ``disk``).
    """
    settings = settings or EvolveSettings()
    job = open_job(raw_config, out_dir, settings, objective, identity_objective, device, quiet)
    try:
        return _run_job(job, objective, test_objective, population, write_model, quiet)
    finally:
        shutil.rmtree(os.path.join(out_dir, CACHE_DIR), ignore_errors=True)
        job.run.close()


def open_job(
    raw_config: RawConfig,
    out_dir: str,
    settings: EvolveSettings,
    objective: Objective,
    identity_objective: dict | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> EvolveJob:
    """Phase 1: the settings and config checked, OUT_DIR opened (or refused) for the run.

    Nothing is written before every check of the config has passed.
    """
    settings.check()
    config = parse_config(raw_config)
    merge_config = config.merge_config
    path = raw_config.path
    method = merge_methods.get(merge_config.merge_method)
    device = resolve_device(device)
    options = MergeOptions(quiet=quiet, device=device, random_seed=settings.seed)
    try:
        check_parameter_keys(
            raw_config.raw, merge_config.merge_method, [p.name for p in method.spec.parameters]
        )
        base_ref, refs = individual_refs(merge_config)
        check_config(merge_config, options)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    if "+" in os.path.abspath(out_dir):
        # best.yml names the evolved models by their folders under OUT_DIR.
        raise ConfigError(
            f"{out_dir}: the output folder's path contains '+', which mergekit reads in "
            "best.yml's model paths as model+LoRA; choose a folder without it"
        )
    names = [str(ref) for ref in refs]
    identity = {
        "config_sha256": hashlib.sha256(config.source.encode()).hexdigest(),
        "models": names,
        "objective": identity_objective or {"name": objective.name},
        "settings": settings.identity(),
    }
    dtype = getattr(torch, merge_config.out_dtype or merge_config.dtype or "float32")
    base = base_ref if base_ref is not None else refs[0]
    run = RunDirectory.open(out_dir, identity, EvolveRecord.from_row, what="evolver run")
    try:
        total = _evolution(settings, len(refs), objective.maximize).total
        run.check_budget(total, option="--generations/--budget")
    except BaseException:
        run.close()
        raise
    return EvolveJob(
        run=run,
        config=config,
        out_dir=out_dir,
        settings=settings,
        options=options,
        names=names,
        folder_names=folder_names(names),
        dtype=dtype,
        device=device,
        base_path=str(base.model.path),
        random_masks=draws_random_masks(method),
    )


def folder_names(names: list[str]) -> list[str]:
    """A folder name per model reference: the last part of its path, made unique."""
    out: list[str] = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name.split("+")[0].rstrip("/")))
        stem = stem.strip(".") or "model"
        unique, k = stem, 2
        while unique in out:
            unique, k = f"{stem}-{k}", k + 1
        out.append(unique)
    return out


def _evolution(settings: EvolveSettings, n: int, maximize: bool) -> Evolution:
    return Evolution(
        n,
        generations=settings.generations,
        f=settings.f,
        cr=settings.cr,
        seed=settings.seed,
        maximize=maximize,
        mode=settings.mode,  # type: ignore[arg-type]  (checked by settings.check)
        budget=settings.budget,
    )


def _run_job(
    job: EvolveJob,
    objective: Objective,
    test_objective: Objective | None,
    placement_mode: str,
    write_model: bool,
    quiet: bool,
) -> EvolveResult:
    """Phases 2-4, in the directory that phase 1 opened and holds."""
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    tokenizer = load_tokenizer(job.base_path, "the evolver")
    if isinstance(objective, ReferencedObjective) and objective.normalized:
        # Each original fine-tune scored alone, before the population takes the memory.
        set_reference_scores(objective, job.out_dir, job.names, job.dtype, job.device, tokenizer)
    model = load_model(job.base_path, job.dtype, job.device)
    population = _load(job, model, placement_mode)
    try:
        # Quiet merges: a bar per candidate's merge would scroll under the run's own bar.
        quiet_options = job.options.model_copy(update={"quiet": True})
        with PopulationMerge(
            job.config.merge_config, quiet_options, floating=population.floating()
        ) as merge:
            merge.write_fixed(model, population.base, population.members())
            live = _Live(job, population, merge, model, tokenizer)
            evolution, resumed, start_test = _run(job, live, objective, test_objective, quiet)
            result = _write_outputs(
                job, live, evolution, objective, test_objective, start_test, resumed
            )
            if write_model:
                _write_model(job, population, evolution)
    finally:
        population.close()
    return result


def _load(job: EvolveJob, model: Any, placement_mode: str) -> Population:
    """Phase 2: the population placed beside the live model (see ``population.py``)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    placement = placement_for(placement_mode, devices)
    began = time.perf_counter()
    population = Population.load(
        job.config.merge_config,
        job.options,
        placement=placement,
        cache_dir=os.path.join(job.out_dir, CACHE_DIR),
        device=job.device,
    )
    LOG.info(
        "population read in %.1f s: %s; offspring %s",
        time.perf_counter() - began,
        population.describe(),
        _offspring_place(population),
    )
    return population


def _offspring_place(population: Population) -> str:
    if population.spare_device is None:
        return "regenerated where read"
    return f"stored on {population.spare_device} while judged"


@dataclass
class _Live:
    """The live model and what writes candidates into it."""

    job: EvolveJob
    population: Population
    merge: PopulationMerge
    model: Any
    tokenizer: Any

    def write_population(self, replaced: dict[int, ModelTensors] | None = None) -> None:
        """The config's merge of the population (``replaced``: index -> offspring)."""
        members = self.population.members(replaced)
        self.merge.write_merge(self.model, self.population.base, members)

    def write_alone(self, tensors: ModelTensors) -> None:
        """One individual (or offspring) alone, as the live model's weights."""
        self.merge.write_tensors(self.model, tensors, self.job.device)

    def write_result(self, evolution: Evolution) -> None:
        """What the run gives: the population's merge, or the best individual."""
        if evolution.mode == "merged":
            self.write_population()
        else:
            best = evolution.best_individual
            self.write_alone(self.population.individuals[0 if best is None else best])


def _run(
    job: EvolveJob,
    live: _Live,
    objective: Objective,
    test_objective: Objective | None,
    quiet: bool,
) -> tuple[Evolution, int, float | None]:
    """Phase 3: the evolution, replaying what ``history.jsonl`` holds; the test score of
    the start (taken once the starting evaluations are told, before any offspring is
    kept)."""
    run, population = job.run, live.population
    evolution = _evolution(job.settings, population.n, objective.maximize)
    starts = 1 if evolution.mode == "merged" else population.n
    resumed = len(run.recorded)
    if resumed:
        LOG.info("resuming: %d evaluations from %s", resumed, HISTORY_FILE)
    run.drop_cut_lines()
    made: dict[int, ModelTensors] = {}  # the offspring of the candidate being scored

    def score(candidate: Candidate, timings: dict[str, float]) -> float:
        made.clear()
        if candidate.key is not None:
            made[candidate.index] = population.offspring(candidate.key)
        if evolution.mode == "merged":
            live.write_population({candidate.individual: made[candidate.index]} if made else {})
        else:
            assert candidate.individual is not None
            live.write_alone(
                made.get(candidate.index, population.individuals[candidate.individual])
            )
        began = time.perf_counter()
        value = objective(live.model, live.tokenizer)
        timings["objective"] = time.perf_counter() - began
        return value

    start_test: float | None = None
    progress = tqdm(total=evolution.total, desc="evolve", unit="eval", disable=bars_disabled(quiet))
    try:
        while (candidate := evolution.ask()) is not None:
            replayed, _ = run.replay([candidate], lambda r, c: r.matches(c))
            record = replayed.get(candidate.index)
            if record is None:
                record = evaluate_candidate(score, Scored(candidate))
                if not record.ok:
                    LOG.warning(
                        "candidate %d failed: %s",
                        record.index,
                        (record.error or "").strip().splitlines()[-1],
                    )
            judgement = evolution.tell(candidate, record.score)
            if candidate.index in replayed:
                if record.accepted != judgement.accepted:
                    raise RunMismatchError(
                        f"{run.history_path}: evaluation {record.index} was "
                        f"{'kept' if record.accepted else 'not kept'} there, but this run "
                        "decides otherwise; the history was not written by this run"
                    )
            else:
                record = replace(record, accepted=judgement.accepted)
                run.append(record)
            if judgement.accepted:
                assert candidate.key is not None
                offspring = made.get(candidate.index)
                if offspring is None:  # a replayed candidate: made again, not scored
                    offspring = population.offspring(candidate.key)
                population.accept(candidate.key, offspring)
            made.clear()
            _stop_if_all_failed(run, evolution, min(evolution.total, starts + population.n))
            if test_objective is not None and len(evolution.history) == starts:
                live.write_result(evolution)
                start_test = float(test_objective(live.model, live.tokenizer))
            progress.update(1)
            best = _current_score(evolution)
            if best is not None:
                progress.set_postfix(best=f"{best:.5g}", refresh=False)
    finally:
        progress.close()
    if test_objective is not None and start_test is None:  # the budget ended the starts
        live.write_result(evolution)
        start_test = float(test_objective(live.model, live.tokenizer))
    return evolution, resumed, start_test


def _stop_if_all_failed(run: RunDirectory[EvolveRecord], evolution: Evolution, first: int) -> None:
    """Stop when the start and the whole first generation (``first`` evaluations) all
    failed: the objective cannot score this model, and going on would only repeat it."""
    if len(evolution.history) != first:
        return
    records = [run.recorded[j.candidate.index] for j in evolution.history]
    if not any(r.ok for r in records):
        raise AllCandidatesFailedError(
            f"every candidate failed; the first error was:\n{records[0].error}"
        )


def _current_score(evolution: Evolution) -> float | None:
    if evolution.mode == "merged":
        return evolution.score
    best = evolution.best_individual
    return None if best is None else evolution.scores[best]


def _start_score(evolution: Evolution, maximize: bool) -> float | None:
    starts = [j.score for j in evolution.history if j.candidate.key is None]
    usable = [s for s in starts if s is not None]
    return best_of(usable, maximize) if usable else None


def _write_outputs(
    job: EvolveJob,
    live: _Live,
    evolution: Evolution,
    objective: Objective,
    test_objective: Objective | None,
    start_test: float | None,
    resumed: int,
) -> EvolveResult:
    """Phase 4: the population's folders, ``best.yml``, ``scores.png``, ``summary.json``."""
    population = live.population
    folders = {}
    for i, name in enumerate(job.folder_names):
        folder = os.path.abspath(os.path.join(job.out_dir, POPULATION_DIR, name))
        population.write_individual(i, folder, quiet=job.options.quiet)
        folders[job.names[i]] = folder
    write_atomic(os.path.join(job.out_dir, "best.yml"), best_config_yaml(job, folders))
    history = [job.run.recorded[j.candidate.index] for j in evolution.history]
    plot_scores(
        [(r.index, r.score) for r in history],
        maximize=objective.maximize,
        title=f"{objective.name} ({evolution.mode} mode)",
        path=os.path.join(job.out_dir, "scores.png"),
    )
    test_scores: dict[str, float] = {}
    if test_objective is not None:
        live.write_result(evolution)
        assert start_test is not None
        test_scores = {
            "start": start_test,
            "result": float(test_objective(live.model, live.tokenizer)),
        }
    best = evolution.best_individual if evolution.mode == "individual" else None
    result = EvolveResult(
        history=history,
        start_score=_start_score(evolution, objective.maximize),
        result_score=_current_score(evolution),
        test_scores=test_scores,
        best_individual=None if best is None else job.names[best],
        resumed=resumed,
        folders=folders,
    )
    result.summary = _summary(job, population, evolution, objective, result)
    write_atomic(
        os.path.join(job.out_dir, "summary.json"), json.dumps(result.summary, indent=2) + "\n"
    )
    return result


def best_config_yaml(job: EvolveJob, folders: dict[str, str]) -> str:
    """The config with each individual's path set to its evolved folder."""

    def to(folder: str):
        def edit(entry: dict) -> None:
            entry["model"] = folder

        return edit

    seed = f" --random-seed {job.settings.seed}" if job.random_masks else ""
    header = (
        "Written by mergekit-pcb-evolve: the config's merge of the evolved population.\n"
        f"Run: mergekit-yaml best.yml OUT{seed}"
    )
    if job.settings.mode == "individual":
        header += "\n(individual mode: the result is the best individual, see summary.json)"
    return config_yaml(job.config.raw, {n: to(f) for n, f in folders.items()}, header)


def _summary(
    job: EvolveJob,
    population: Population,
    evolution: Evolution,
    objective: Objective,
    result: EvolveResult,
) -> dict[str, Any]:
    accepted = Counter(j.candidate.individual for j in evolution.history if j.accepted)
    offered = Counter(
        j.candidate.individual for j in evolution.history if j.candidate.key is not None
    )
    stores = [("base", population.base), *zip(job.names, population.individuals, strict=True)]
    bytes_by_place: Counter = Counter()
    for _, store in stores:
        if store is not None:
            bytes_by_place[store.where] += store.nbytes
    spare = max(s.nbytes for s in population.individuals)
    start: dict[str, Any] = {"score": result.start_score}
    end: dict[str, Any] = {"score": result.result_score}
    if result.test_scores:
        start["test_score"] = result.test_scores["start"]
        end["test_score"] = result.test_scores["result"]
    if result.best_individual is not None:
        end["individual"] = result.best_individual
        end["folder"] = result.folders[result.best_individual]
    return {
        "objective": objective.name,
        "direction": "maximize" if objective.maximize else "minimize",
        "method": job.config.merge_config.merge_method,
        "mode": evolution.mode,
        "settings": {
            "generations": job.settings.generations,
            "f": job.settings.f,
            "cr": job.settings.cr,
            "seed": job.settings.seed,
            "budget": job.settings.budget,
        },
        "models": job.names,
        "population": result.folders,
        "evaluations": len(result.history),
        "resumed": result.resumed,
        "failed": sum(not r.ok for r in result.history),
        "start": start,
        "result": end,
        "acceptances": {
            name: {"accepted": accepted[i], "offspring": offered[i]}
            for i, name in enumerate(job.names)
        },
        "memory": {
            "where": population.describe(),
            "bytes": dict(sorted(bytes_by_place.items())),
            "offspring": _offspring_place(population),
            "offspring_bytes": 0 if population.spare_device is None else spare,
        },
    }


def _write_model(job: EvolveJob, population: Population, evolution: Evolution) -> None:
    """``merged/``: mergekit's merge of ``best.yml``, or the best individual."""
    out = os.path.join(job.out_dir, "merged")
    if evolution.mode == "individual":
        best = evolution.best_individual
        population.write_individual(0 if best is None else best, out, quiet=job.options.quiet)
        return
    best_config = read_config(os.path.join(job.out_dir, "best.yml"))
    options = MergeOptions(
        quiet=job.options.quiet,
        device=job.device,
        random_seed=job.settings.seed if job.random_masks else None,
    )
    merge_into(best_config.merge_config, out, options, config_source=best_config.source)
