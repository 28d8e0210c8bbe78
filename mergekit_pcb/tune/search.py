"""CMA-ES over the per-model coefficients, with a resumable history on disk.

The search is independent of models: it asks ``evaluate(coefficients) -> score``
and knows whether higher is better. Every evaluation is appended to
``history.jsonl`` (flushed at once), so an interrupted run loses nothing; rerunning
the same command replays the recorded scores through the same seeded CMA-ES, which
therefore asks for the same candidates, and carries on where the run stopped.
``run.json`` identifies the run (config, objective, settings): a different run is
refused rather than mixed into the same directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cma
import numpy as np
from tqdm import tqdm

LOG = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class SearchSettings:
    """CMA-ES settings; bounds [0.5, 3.0] and start 1.0 as in the paper's NLP search."""

    lower: float = 0.5
    upper: float = 3.0
    start: float = 1.0
    sigma0: float = 0.5
    popsize: int | None = None  # None: CMA-ES's default 4 + 3 ln(n)
    budget: int = 100  # evaluations, the starting point included
    seed: int = 1

    def __post_init__(self) -> None:
        if not (
            math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper
        ):
            raise ValueError(
                f"bounds must be finite with lower < upper, got [{self.lower}, {self.upper}]"
            )
        if not self.lower <= self.start <= self.upper:
            raise ValueError(
                f"start {self.start} is outside the bounds [{self.lower}, {self.upper}]"
            )
        if not self.sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {self.sigma0}")
        if self.popsize is not None and self.popsize < 2:
            raise ValueError(f"population size must be at least 2, got {self.popsize}")
        if self.seed < 1:
            raise ValueError("seed must be a positive integer (cma treats 0 as 'random')")


@dataclass
class Evaluation:
    index: int
    coefficients: list[float]
    score: float | None
    seconds: float
    objective_seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SearchResult:
    start: Evaluation
    best: Evaluation
    history: list[Evaluation]


class RunMismatchError(RuntimeError):
    pass


class AllCandidatesFailedError(RuntimeError):
    pass


def prepare_run_dir(out_dir: str, identity: dict) -> list[Evaluation]:
    """Create or reopen ``out_dir`` for the run ``identity``; return its recorded history."""
    os.makedirs(out_dir, exist_ok=True)
    run_path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as file:
            recorded = json.load(file)
        if recorded != json.loads(json.dumps(identity)):
            changed = sorted(
                k
                for k in set(recorded) | set(identity)
                if recorded.get(k) != json.loads(json.dumps(identity.get(k)))
            )
            raise RunMismatchError(
                f"{out_dir} holds a different tuning run (differs in: {', '.join(changed)}); "
                "use another output directory, or delete this one to start over"
            )
    else:
        _write_atomic(run_path, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    history = []
    path = os.path.join(out_dir, HISTORY_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    try:
                        history.append(Evaluation(**json.loads(line)))
                    except (json.JSONDecodeError, TypeError):
                        break  # a line cut by a crash: re-evaluate from there
    return history


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


#: ``evaluate(coefficients, timings) -> score``; it may record ``timings["objective"]``.
Evaluate = Callable[[Sequence[float], dict], float]


def run_search(
    evaluate: Evaluate,
    n_models: int,
    *,
    maximize: bool,
    out_dir: str,
    identity: dict,
    settings: SearchSettings,
    on_improvement: Callable[[Evaluation], None] | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Search ``n_models`` coefficients; return the starting point, the best and all evaluations."""
    recorded = prepare_run_dir(out_dir, identity)
    history_path = os.path.join(out_dir, HISTORY_FILE)
    # Rewrite the history without a possibly truncated tail line.
    _write_atomic(history_path, "".join(json.dumps(asdict(e)) + "\n" for e in recorded))
    history: list[Evaluation] = []
    best: Evaluation | None = None

    def better(a: Evaluation, b: Evaluation | None) -> bool:
        if not a.ok:
            return False
        if b is None or not b.ok:
            return True
        return a.score > b.score if maximize else a.score < b.score

    def run_one(coefficients: list[float]) -> Evaluation:
        nonlocal best
        index = len(history)
        if index < len(recorded):
            evaluation = recorded[index]
            if not np.allclose(evaluation.coefficients, coefficients, rtol=0, atol=1e-12):
                raise RunMismatchError(
                    f"{history_path} line {index + 1} does not match the candidate the "
                    "search asks for; the history was not written by this run"
                )
        else:
            evaluation = _evaluate(evaluate, index, coefficients)
            with open(history_path, "a", encoding="utf-8") as file:
                file.write(json.dumps(asdict(evaluation)) + "\n")
                file.flush()
                os.fsync(file.fileno())
            if not evaluation.ok:
                LOG.warning(
                    "candidate %d %s failed: %s",
                    index,
                    coefficients,
                    evaluation.error.strip().splitlines()[-1],
                )
        history.append(evaluation)
        if better(evaluation, best):
            best = evaluation
            if on_improvement is not None:
                on_improvement(evaluation)
        progress.update(1)
        if best is not None and best.ok:
            progress.set_postfix(best=f"{best.score:.5g}", refresh=False)
        return evaluation

    def minimised(evaluation: Evaluation, penalty: float) -> float:
        if not evaluation.ok:
            return penalty
        return -evaluation.score if maximize else evaluation.score

    options = {
        "bounds": [settings.lower, settings.upper],
        "seed": settings.seed,
        "verbose": -9,
    }
    if settings.popsize is not None:
        options["popsize"] = settings.popsize
    start = [settings.start] * n_models
    es = cma.CMAEvolutionStrategy(start, settings.sigma0, options)
    popsize = es.popsize
    if settings.budget < 1 + popsize:
        raise ValueError(
            f"budget {settings.budget} is too small: the starting point and one generation "
            f"of {popsize} candidates need {1 + popsize} evaluations"
        )
    progress = tqdm(total=settings.budget, desc="CMA-ES", unit="eval", disable=quiet)
    try:
        start_eval = run_one(start)
        worst = None if not start_eval.ok else minimised(start_eval, 0.0)
        while len(history) + popsize <= settings.budget and not es.stop():
            candidates = es.ask()
            # Objectives may draw from NumPy's global RNG, which CMA-ES also uses;
            # restoring it keeps the candidates identical on resume.
            rng_state = np.random.get_state()
            evaluations = [run_one([float(v) for v in x]) for x in candidates]
            np.random.set_state(rng_state)
            if not any(e.ok for e in history):
                first = next(e for e in history if not e.ok)
                raise AllCandidatesFailedError(
                    f"every candidate failed; the first error was:\n{first.error}"
                )
            ok_values = [minimised(e, 0.0) for e in evaluations if e.ok]
            if ok_values:
                top = max(ok_values)
                worst = top if worst is None else max(worst, top)
            penalty = worst + 1.0 + abs(worst)
            es.tell(candidates, [minimised(e, penalty) for e in evaluations])
    finally:
        progress.close()
    return SearchResult(start=history[0], best=best or history[0], history=history)


def _evaluate(evaluate: Evaluate, index: int, coefficients: list[float]) -> Evaluation:
    began = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        score = evaluate(coefficients, timings)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"objective returned {score!r}, not a finite number")
        error = None
    except KeyboardInterrupt:
        raise
    except Exception:
        score, error = None, traceback.format_exc()
    return Evaluation(
        index=index,
        coefficients=coefficients,
        score=None if score is None else float(score),
        seconds=time.perf_counter() - began,
        objective_seconds=timings.get("objective", 0.0),
        error=error,
    )
