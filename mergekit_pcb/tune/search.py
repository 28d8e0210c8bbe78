"""The search over the per-model weights, with a resumable history on disk.

The search is independent of models: it asks for candidates to be scored, in
batches, and knows whether higher is better (:func:`is_better`, the one definition).

1. **Scale.** LLM merges often want a common weight far from 1 (a six-expert ``pcb``
   merge did best at 0.375; ``task_arithmetic``'s weights add up). So the search first
   scores the start weights ``w0`` (the config's own) times a common scale on a log
   grid over ``[scale_min, scale_max]`` (1/8 to 8: seven points, 1 among them), then
   two points beside the best (its geometric midpoints with its neighbours, or two
   points towards its one neighbour at an edge): nine evaluations.
2. **Per model.** CMA-ES (pycma, ask/tell, real bounds) over one weight per model,
   in coordinates relative to the best scaled start ``s* w0``: the box is
   ``[lower_factor, upper_factor] x s* w0`` (0.5 to 3, the paper's NLP box when the
   start is 1), ``sigma0`` is in units of the start. With absolute ``lower``/``upper``
   the search runs in plain weights from the start (the paper's form) and skips step 1.

A best weight on the edge of its box (or a best scale at the edge of the scale
range) is reported, with the option that widens it.

Every evaluation is appended to ``history.jsonl`` as it finishes (flushed at once),
so an interrupted run loses nothing; rerunning the same command replays the recorded
scores through the same seeded search, which therefore asks for the same candidates,
and carries on. A larger budget extends a finished run the same way. ``run.json``
identifies the run (config, objective, settings); a different run is refused, naming
what differs. Candidates of one batch are independent: an evaluator may score them
in parallel (rows are then written as they finish, and sorted by index when read).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import cma
import numpy as np
from tqdm import tqdm

LOG = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"

#: Scale grid points per side of 1, and the midpoints tried beside the best.
_SCALE_STEPS = 3
SCALE_EVALUATIONS = 1 + 2 * _SCALE_STEPS + 2
#: A best weight closer than this share of its box's width to an edge is "on" it: CMA-ES
#: maps its samples smoothly into the box, so an optimum beyond an edge leaves the best
#: candidates near the edge rather than exactly on it.
_ON_BOUND = 0.1


def is_better(a: float, b: float | None, maximize: bool) -> bool:
    """Whether score ``a`` beats ``b`` (None: no score yet)."""
    return b is None or (a > b if maximize else a < b)


def best_of(scores: Iterable[float], maximize: bool) -> float:
    """The best of ``scores`` by :func:`is_better`."""
    best = None
    for score in scores:
        if is_better(score, best, maximize):
            best = score
    if best is None:
        raise ValueError("no scores")
    return best


@dataclass(frozen=True)
class SearchSettings:
    """The search's settings; the defaults are ``mergekit-pcb-tune``'s.

    ``start``: one common start weight for every model (None: the config's weights).
    ``lower``/``upper``: absolute bounds; None (both) for the relative box
    ``[lower_factor, upper_factor] x`` the best scaled start.
    """

    start: float | None = None
    lower: float | None = None
    upper: float | None = None
    lower_factor: float = 0.5
    upper_factor: float = 3.0
    scale_search: bool = True
    scale_min: float = 0.125
    scale_max: float = 8.0
    sigma0: float = 0.5
    popsize: int | None = None  # None: CMA-ES's default 4 + 3 ln(n)
    budget: int = 100  # evaluations, the starting point included
    seed: int = 1

    def __post_init__(self) -> None:
        if (self.lower is None) != (self.upper is None):
            raise ValueError("give both --lower and --upper (absolute bounds), or neither")
        if self.absolute:
            _check_interval("bounds", self.lower, self.upper)
            if self.start is not None and not self.lower <= self.start <= self.upper:
                raise ValueError(
                    f"start {self.start} is outside the bounds [{self.lower}, {self.upper}]"
                )
        _check_interval("the relative box", self.lower_factor, self.upper_factor)
        if not 0 < self.lower_factor <= 1 <= self.upper_factor:
            raise ValueError(
                "the relative box must contain the start: need 0 < lower factor <= 1 <= "
                f"upper factor, got [{self.lower_factor}, {self.upper_factor}]"
            )
        if not 0 < self.scale_min < 1 < self.scale_max or not math.isfinite(self.scale_max):
            raise ValueError(
                "the scale range must contain 1: need 0 < scale min < 1 < scale max, "
                f"got [{self.scale_min}, {self.scale_max}]"
            )
        if self.start is not None and not math.isfinite(self.start):
            raise ValueError(f"start must be finite, got {self.start}")
        if not self.sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {self.sigma0}")
        if self.popsize is not None and self.popsize < 2:
            raise ValueError(f"population size must be at least 2, got {self.popsize}")
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget}")
        if self.seed < 1:
            raise ValueError("seed must be a positive integer (cma treats 0 as 'random')")

    @property
    def absolute(self) -> bool:
        return self.lower is not None


def _check_interval(what: str, low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{what} must be finite with lower < upper, got [{low}, {high}]")


@dataclass
class Evaluation:
    """One scored candidate: its weights, score (None if it failed) and timings."""

    index: int
    weights: list[float]
    score: float | None
    seconds: float
    objective_seconds: float
    error: str | None = None
    phase: str = "cma"  # "start", "scale" (the common-scale search) or "cma"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Candidate:
    index: int
    weights: list[float]
    phase: str = "cma"


@dataclass
class BoundHit:
    """A best weight (or scale) on the edge of its search box, and how to widen it."""

    what: str  # a model name, or "common scale"
    value: float
    side: str  # "lower" or "upper"
    bound: float
    widen: str  # the command-line option that widens it

    def message(self) -> str:
        return (
            f"{self.what}: the best value {self.value:.4g} is at the {self.side} bound "
            f"{self.bound:.4g} of the search (within 10% of the box), so the best may lie "
            f"beyond it; widen it with {self.widen}"
        )


@dataclass
class SearchResult:
    start: Evaluation
    best: Evaluation
    history: list[Evaluation]
    on_bound: list[BoundHit] = field(default_factory=list)
    resumed: int = 0  # evaluations replayed from history.jsonl


class RunMismatchError(RuntimeError):
    pass


class AllCandidatesFailedError(RuntimeError):
    pass


#: ``evaluate(weights, timings) -> score``; it may record ``timings["objective"]``.
Evaluate = Callable[[Sequence[float], dict], float]


@runtime_checkable
class BatchEvaluator(Protocol):
    """Scores a batch of independent candidates, yielding each as it finishes."""

    def evaluate_batch(self, candidates: Sequence[Candidate]) -> Iterator[Evaluation]: ...


class SerialEvaluator:
    """Scores candidates one after another with ``evaluate``."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate

    def evaluate_batch(self, candidates: Sequence[Candidate]) -> Iterator[Evaluation]:
        for candidate in candidates:
            yield evaluate_candidate(self.evaluate, candidate)


def evaluate_candidate(evaluate: Evaluate, candidate: Candidate) -> Evaluation:
    """Score one candidate; an exception or a non-finite score becomes a failed one."""
    began = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        score = evaluate(candidate.weights, timings)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"objective returned {score!r}, not a finite number")
        error = None
    except KeyboardInterrupt:
        raise
    except Exception:
        score, error = None, traceback.format_exc()
    return Evaluation(
        index=candidate.index,
        weights=list(candidate.weights),
        score=None if score is None else float(score),
        seconds=time.perf_counter() - began,
        objective_seconds=timings.get("objective", 0.0),
        error=error,
        phase=candidate.phase,
    )


# --- the run directory -------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_differences(recorded: dict, identity: dict) -> list[str]:
    """``key old -> new`` for every setting that differs between two run identities."""
    old, new = _flatten(recorded), _flatten(json.loads(json.dumps(identity)))
    return [
        f"{key} {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def run_identity(identity: dict, settings: SearchSettings) -> dict:
    """What identifies a run in ``run.json``: ``identity`` and the settings but the budget.

    The budget is left out so that a larger one extends a run.
    """
    return {**identity, "settings": {**asdict(settings), "budget": None}}


def prepare_run_dir(out_dir: str, identity: dict) -> tuple[dict, dict[int, Evaluation]]:
    """Create or reopen ``out_dir`` for the run ``identity``.

    Returns the run's record (``identity`` plus what the first run resolved, such as
    whether the scale search runs) and the recorded evaluations by index.
    """
    os.makedirs(out_dir, exist_ok=True)
    run_path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as file:
            record = json.load(file)
        recorded_identity = {k: v for k, v in record.items() if k in identity}
        if recorded_identity != json.loads(json.dumps(identity)) or set(identity) - set(record):
            raise RunMismatchError(
                f"{out_dir} holds a different tuning run (differs in: "
                f"{'; '.join(describe_differences(recorded_identity, identity))}); "
                "use another output directory, or delete this one to start over"
            )
    else:
        record = json.loads(json.dumps(identity))
        write_atomic(run_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record, read_history(os.path.join(out_dir, HISTORY_FILE))


def open_run(
    out_dir: str, identity: dict, settings: SearchSettings
) -> tuple[dict, dict[int, Evaluation]]:
    """:func:`prepare_run_dir` for this search, refusing a budget below what is recorded.

    Cheap: callers run it before any heavy work, so that a wrong directory or budget
    is refused at once.
    """
    record, recorded = prepare_run_dir(out_dir, run_identity(identity, settings))
    done = 0
    while done in recorded:
        done += 1
    if done > settings.budget:
        raise RunMismatchError(
            f"{out_dir} already holds {done} evaluations, more than --budget "
            f"{settings.budget}; give a budget of at least {done} to extend the run"
        )
    return record, recorded


def read_history(path: str) -> dict[int, Evaluation]:
    """The evaluations recorded in ``path`` by index (a line cut by a crash is dropped)."""
    recorded: dict[int, Evaluation] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                if not line.strip():
                    continue
                try:
                    evaluation = Evaluation(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue
                recorded[evaluation.index] = evaluation
    return recorded


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


def _write_history(path: str, evaluations: Iterable[Evaluation]) -> None:
    rows = sorted(evaluations, key=lambda e: e.index)
    write_atomic(path, "".join(json.dumps(asdict(e)) + "\n" for e in rows))


# --- the search ----------------------------------------------------------------------


def scale_grid(settings: SearchSettings) -> list[float]:
    """The common scales of the first batch: 1 first, then the log grid around it."""
    below = np.geomspace(settings.scale_min, 1.0, _SCALE_STEPS + 1)[:-1]
    above = np.geomspace(1.0, settings.scale_max, _SCALE_STEPS + 1)[1:]
    return [1.0, *(float(s) for s in below), *(float(s) for s in above)]


def default_popsize(n_models: int, settings: SearchSettings) -> int:
    if settings.popsize is not None:
        return settings.popsize
    return int(cma.CMAOptions().eval("popsize", loc={"N": n_models}))


def plan_scale_search(settings: SearchSettings, n_models: int) -> bool:
    """Whether the scale search runs: asked for, relative box, and room in the budget."""
    if not settings.scale_search or settings.absolute:
        return False
    needed = SCALE_EVALUATIONS + default_popsize(n_models, settings)
    if settings.budget < needed:
        LOG.warning(
            "budget %d leaves no room for the scale search (%d evaluations) and one "
            "generation: searching from the start weights as given",
            settings.budget,
            needed,
        )
        return False
    return True


class _Run:
    """One search's state: the history, the best so far, the recorded rows to replay."""

    def __init__(
        self,
        evaluator: BatchEvaluator,
        maximize: bool,
        history_path: str,
        recorded: dict[int, Evaluation],
        on_improvement: Callable[[Evaluation], None] | None,
        progress: tqdm,
    ):
        self.evaluator = evaluator
        self.maximize = maximize
        self.history_path = history_path
        self.recorded = recorded
        self.on_improvement = on_improvement
        self.progress = progress
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None

    def better(self, a: Evaluation) -> bool:
        return a.ok and (self.best is None or is_better(a.score, self.best.score, self.maximize))

    def run_batch(self, weights: Sequence[Sequence[float]], phase: str) -> list[Evaluation]:
        """Score a batch (replaying recorded rows); return it in candidate order."""
        first = len(self.history)
        candidates = [
            Candidate(first + k, [float(v) for v in w], "start" if first + k == 0 else phase)
            for k, w in enumerate(weights)
        ]
        done: dict[int, Evaluation] = {}
        todo = []
        for candidate in candidates:
            row = self.recorded.get(candidate.index)
            if row is None:
                todo.append(candidate)
            elif np.allclose(row.weights, candidate.weights, rtol=0, atol=1e-12):
                done[candidate.index] = row
            else:
                raise RunMismatchError(
                    f"{self.history_path}: evaluation {candidate.index} does not match the "
                    "candidate the search asks for; the history was not written by this run"
                )
        self.progress.update(len(done))
        if todo:
            with open(self.history_path, "a", encoding="utf-8") as file:
                for evaluation in self.evaluator.evaluate_batch(todo):
                    file.write(json.dumps(asdict(evaluation)) + "\n")
                    file.flush()
                    os.fsync(file.fileno())
                    done[evaluation.index] = evaluation
                    self.recorded[evaluation.index] = evaluation
                    if not evaluation.ok:
                        LOG.warning(
                            "candidate %d %s failed: %s",
                            evaluation.index,
                            evaluation.weights,
                            evaluation.error.strip().splitlines()[-1],
                        )
                    self.progress.update(1)
        batch = [done[c.index] for c in candidates]
        for evaluation in batch:
            self.history.append(evaluation)
            if self.better(evaluation):
                self.best = evaluation
                if self.on_improvement is not None:
                    self.on_improvement(evaluation)
        if self.best is not None:
            self.progress.set_postfix(best=f"{self.best.score:.5g}", refresh=False)
        # The start alone may fail; the start and the first batch after it may not.
        if len(self.history) > 1 and not any(e.ok for e in self.history):
            first_error = next(e for e in self.history if not e.ok)
            raise AllCandidatesFailedError(
                f"every candidate failed; the first error was:\n{first_error.error}"
            )
        return batch

    def minimised(self, evaluation: Evaluation, penalty: float) -> float:
        if not evaluation.ok:
            return penalty
        return -evaluation.score if self.maximize else evaluation.score


def run_search(
    evaluate: Evaluate | BatchEvaluator,
    n_models: int,
    *,
    maximize: bool,
    out_dir: str,
    identity: dict,
    settings: SearchSettings,
    start: Sequence[float] | None = None,
    model_names: Sequence[str] | None = None,
    on_improvement: Callable[[Evaluation], None] | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Search ``n_models`` weights; return the start, the best and every evaluation.

    ``start``: the config's weights (used unless ``settings.start`` is given; default
    all 1). ``evaluate`` scores one candidate, or is a :class:`BatchEvaluator`.
    """
    names = list(model_names or [f"model {i}" for i in range(n_models)])
    w0 = _start_weights(settings, start, n_models, names)
    record, recorded = open_run(out_dir, identity, settings)
    if "scale_search" not in record:  # decided once, by the first run of this directory
        record["scale_search"] = plan_scale_search(settings, n_models)
        write_atomic(
            os.path.join(out_dir, RUN_FILE), json.dumps(record, indent=2, sort_keys=True) + "\n"
        )
    resumed = len(recorded)  # ``recorded`` grows as the run goes on
    if resumed:
        LOG.info("resuming: %d evaluations from %s", resumed, HISTORY_FILE)
    history_path = os.path.join(out_dir, HISTORY_FILE)
    _write_history(history_path, recorded.values())  # drops a line cut by a crash

    evaluator = evaluate if isinstance(evaluate, BatchEvaluator) else SerialEvaluator(evaluate)
    popsize = default_popsize(n_models, settings)
    scale_search = bool(record["scale_search"])
    first = SCALE_EVALUATIONS if scale_search else 1
    if settings.budget < first + popsize:
        what = "the scale search" if scale_search else "the starting point"
        raise ValueError(
            f"budget {settings.budget} is too small: {what} and one generation of {popsize} "
            f"candidates need {first + popsize} evaluations"
        )
    planned = first + popsize * ((settings.budget - first) // popsize)
    progress = tqdm(total=planned, desc="search", unit="eval", disable=quiet)
    run = _Run(evaluator, maximize, history_path, recorded, on_improvement, progress)
    try:
        scale, scale_hits = 1.0, []
        if scale_search:
            scale, scale_hits = _search_scale(run, w0, settings)
        else:
            run.run_batch([w0], "start")
        anchor = [scale * w for w in w0]
        lower, upper, to_weights = _box(settings, anchor)
        es = cma.CMAEvolutionStrategy(
            [1.0] * n_models if not settings.absolute else _clip(anchor, lower, upper),
            settings.sigma0,
            {"bounds": [lower, upper], "seed": settings.seed, "verbose": -9, "popsize": popsize},
        )
        worst = None
        while len(run.history) + popsize <= settings.budget and not es.stop():
            xs = es.ask()
            # Objectives may draw from NumPy's global RNG, which CMA-ES also uses;
            # restoring it keeps the candidates identical on resume.
            rng_state = np.random.get_state()
            batch = run.run_batch([to_weights(x) for x in xs], "cma")
            np.random.set_state(rng_state)
            ok_values = [run.minimised(e, 0.0) for e in batch if e.ok]
            if ok_values:
                worst = max(ok_values) if worst is None else max(worst, *ok_values)
            if worst is None:  # nothing in this search phase has succeeded yet
                worst = max(run.minimised(e, 0.0) for e in run.history if e.ok)
            es.tell(xs, [run.minimised(e, worst + 1.0 + abs(worst)) for e in batch])
        progress.total = len(run.history)
    finally:
        progress.close()
    best = run.best or run.history[0]
    hits = scale_hits + _bound_hits(best.weights, names, settings, anchor, lower, upper)
    for hit in hits:
        LOG.warning(hit.message())
    return SearchResult(run.history[0], best, run.history, hits, resumed=resumed)


def _start_weights(
    settings: SearchSettings, start: Sequence[float] | None, n: int, names: list[str]
) -> list[float]:
    if settings.start is not None:
        return [float(settings.start)] * n
    w0 = [1.0] * n if start is None else [float(w) for w in start]
    if len(w0) != n:
        raise ValueError(f"got {len(w0)} start weights for {n} models")
    if not settings.absolute:
        zero = [name for name, w in zip(names, w0, strict=True) if w == 0]
        if zero:
            raise ValueError(
                f"the start weight of {', '.join(zero)} is 0, and the search box is relative "
                "to the start: give --start or absolute --lower/--upper"
            )
    return w0


def _search_scale(
    run: _Run, w0: list[float], settings: SearchSettings
) -> tuple[float, list[BoundHit]]:
    """Score ``s * w0`` on the scale grid and beside its best; return the best scale."""
    grid = scale_grid(settings)
    scored = dict(
        zip(grid, run.run_batch([[s * w for w in w0] for s in grid], "scale"), strict=True)
    )
    ordered = sorted(grid)
    best = _best_scale(scored, run.maximize)
    at = ordered.index(best)
    neighbours = [ordered[j] for j in (at - 1, at + 1) if 0 <= j < len(ordered)]
    if len(neighbours) == 2:  # the geometric midpoints on either side
        beside = [math.sqrt(best * n) for n in neighbours]
    else:  # at the edge of the range: two points towards the one neighbour, so 9 in all
        (n,) = neighbours
        beside = [best ** (2 / 3) * n ** (1 / 3), best ** (1 / 3) * n ** (2 / 3)]
    batch = run.run_batch([[s * w for w in w0] for s in beside], "scale")
    scored.update(zip(beside, batch, strict=True))
    best = _best_scale(scored, run.maximize)
    hits = []
    for side, edge, widen in (
        ("lower", settings.scale_min, f"--scale-min {settings.scale_min / 4:g}"),
        ("upper", settings.scale_max, f"--scale-max {settings.scale_max * 4:g}"),
    ):
        if best == edge:
            hits.append(BoundHit("common scale", best, side, edge, widen))
    LOG.info("best common scale of the start weights: %.4g", best)
    return best, hits


def _best_scale(scored: dict[float, Evaluation], maximize: bool) -> float:
    best, best_score = 1.0, None
    for scale, evaluation in scored.items():
        if evaluation.ok and is_better(evaluation.score, best_score, maximize):
            best, best_score = scale, evaluation.score
    return best


def _box(
    settings: SearchSettings, anchor: list[float]
) -> tuple[float, float, Callable[[Sequence[float]], list[float]]]:
    """CMA-ES bounds and the map from its coordinates to weights."""
    if settings.absolute:
        return settings.lower, settings.upper, lambda x: [float(v) for v in x]
    return (
        settings.lower_factor,
        settings.upper_factor,
        lambda x: [float(v) * a for v, a in zip(x, anchor, strict=True)],
    )


def _clip(values: list[float], lower: float, upper: float) -> list[float]:
    return [min(max(v, lower), upper) for v in values]


def _bound_hits(
    weights: list[float],
    names: list[str],
    settings: SearchSettings,
    anchor: list[float],
    lower: float,
    upper: float,
) -> list[BoundHit]:
    """The models whose best weight is near an edge of its box.

    Near: within ``_ON_BOUND`` of the box's width, measured on a log scale for the
    relative box (weights act multiplicatively: 0.6 is as far from 0.5 as 3.6 from 3).
    """
    hits = []
    for name, weight, a in zip(names, weights, anchor, strict=True):
        if settings.absolute:
            position, edges = weight, {"lower": lower, "upper": upper}
        else:
            position = math.log(max(weight / a, 1e-300))
            edges = {"lower": math.log(lower), "upper": math.log(upper)}
        width = edges["upper"] - edges["lower"]
        for factor_side, edge in edges.items():
            if abs(position - edge) <= _ON_BOUND * width:
                bound = edge if settings.absolute else math.exp(edge) * a
                # A negative start flips which factor bounds which side of the weight.
                side = factor_side if settings.absolute or a > 0 else _other(factor_side)
                hits.append(BoundHit(name, weight, side, bound, _widen(settings, factor_side)))
    return hits


def _other(side: str) -> str:
    return "upper" if side == "lower" else "lower"


def _widen(settings: SearchSettings, side: str) -> str:
    """The option that moves the ``side`` edge of the box outwards."""
    if settings.absolute:
        width = settings.upper - settings.lower
        if side == "lower":
            return f"--lower {settings.lower - width:g}"
        return f"--upper {settings.upper + width:g}"
    if side == "lower":
        return f"--lower-factor {settings.lower_factor / 2:g}"
    return f"--upper-factor {settings.upper_factor * 2:g}"
