"""The search over the per-model weights, in ask/tell form: :class:`WeightSearch`.

The search is independent of models and files: it asks for batches of candidates
(:meth:`WeightSearch.ask`), is told their evaluations (:meth:`WeightSearch.tell`), and
knows whether higher is better. Its caller owns the loop, and with it the history on
disk and the evaluation (``driver.py``).

1. **Common scale.** LLM merges often want a common weight far from 1 (a six-expert
   ``pcb`` merge did best at 0.375; ``task_arithmetic``'s weights add up). So the search
   first scores the start weights ``w0`` (the config's own) times a common scale on a
   log grid over ``[scale_min, scale_max]`` (1/8 to 8: seven points, 1 among them), then
   two points beside the best (its geometric midpoints with its neighbours, or two
   points towards its one neighbour at an edge): nine evaluations.
2. **Per model.** CMA-ES (pycma, ask/tell, real bounds) over one weight per model,
   in coordinates relative to the scaled start ``s* w0`` (``s*`` the best common
   scale): the box is ``[lower_factor, upper_factor] x s* w0`` (0.5 to 3, the paper's
   NLP box when the start is 1), ``sigma0`` is in units of the start. With absolute
   ``lower``/``upper`` the search runs in plain weights from the start (the paper's
   form) and skips step 1.

A best weight on the edge of its box (or a best common scale at the edge of the scale
range) is reported, with the option that widens it.

The search is deterministic for a seed: told the same scores, it asks for the same
candidates, which is what lets a rerun replay a recorded history and carry on.
Candidates of one batch are independent, so they may be scored in parallel; they are
told back in any order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mergekit_pcb.tune.records import Candidate, Evaluation, is_better

if TYPE_CHECKING:
    import cma

LOG = logging.getLogger(__name__)

#: Scale grid points per side of 1, and the midpoints tried beside the best.
_SCALE_STEPS = 3
SCALE_EVALUATIONS = 1 + 2 * _SCALE_STEPS + 2
#: A best weight closer than this share of its box's width to an edge is "on" it: CMA-ES
#: maps its samples smoothly into the box, so an optimum beyond an edge leaves the best
#: candidates near the edge rather than exactly on it.
_ON_BOUND = 0.1


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
    resumed: int = 0  # evaluations replayed from a recorded history


class AllCandidatesFailedError(RuntimeError):
    pass


def scale_grid(settings: SearchSettings) -> list[float]:
    """The common scales of the first batch: 1 first, then the log grid around it."""
    below = np.geomspace(settings.scale_min, 1.0, _SCALE_STEPS + 1)[:-1]
    above = np.geomspace(1.0, settings.scale_max, _SCALE_STEPS + 1)[1:]
    return [1.0, *(float(s) for s in below), *(float(s) for s in above)]


def default_popsize(n_models: int, settings: SearchSettings) -> int:
    if settings.popsize is not None:
        return settings.popsize
    import cma  # here: cma imports scipy (about a second), which --help need not wait for

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


def planned_evaluations(settings: SearchSettings, n_models: int, scale_search: bool) -> int:
    """How many evaluations the search runs (whole generations within the budget).

    Refuses a budget without room for the first step and one generation.
    """
    popsize = default_popsize(n_models, settings)
    first = SCALE_EVALUATIONS if scale_search else 1
    if settings.budget < first + popsize:
        what = "the scale search" if scale_search else "the starting point"
        raise ValueError(
            f"budget {settings.budget} is too small: {what} and one generation of {popsize} "
            f"candidates need {first + popsize} evaluations"
        )
    return first + popsize * ((settings.budget - first) // popsize)


def start_weights(
    settings: SearchSettings,
    config_weights: Sequence[float] | None,
    model_names: Sequence[str],
) -> list[float]:
    """The numbers the search starts from: ``settings.start`` for every one, else the
    config's (``config_weights``; None: all 1). ``model_names`` name the numbers.

    Refuses a start of 0 in the relative box (a multiple of 0 is 0).
    """
    n = len(model_names)
    if settings.start is not None:
        return [float(settings.start)] * n
    if config_weights is None:
        return [1.0] * n
    if len(config_weights) != n:
        raise ValueError(f"got {len(config_weights)} start weights for {n} models")
    weights = [float(w) for w in config_weights]
    if not settings.absolute:
        zero = [name for name, w in zip(model_names, weights, strict=True) if w == 0]
        if zero:
            raise ValueError(
                f"the start weight of {', '.join(zero)} is 0, and the search box is relative "
                "to the start: give --start or absolute --lower/--upper"
            )
    return weights


class WeightSearch:
    """One search of a weight per model, asked and told batch by batch::

        search = WeightSearch(settings, start, maximize=False, scale_search=True)
        while candidates := search.ask():
            search.tell([score(candidate) for candidate in candidates])
        result = search.result()

    ``start``: the start weights (see :func:`start_weights`); ``scale_search``: whether
    step 1 runs (:func:`plan_scale_search`, decided once per run). A failed evaluation
    scores worse than every successful one; if the start and the first batch after it
    all fail, :meth:`tell` raises :class:`AllCandidatesFailedError`.
    """

    def __init__(
        self,
        settings: SearchSettings,
        start: Sequence[float],
        *,
        maximize: bool,
        scale_search: bool,
        model_names: Sequence[str] | None = None,
    ):
        self.settings = settings
        self.start = [float(w) for w in start]
        self.n_models = len(self.start)
        self.names = list(model_names or [f"model {i}" for i in range(self.n_models)])
        self.maximize = maximize
        self.scale_search = scale_search
        self.popsize = default_popsize(self.n_models, settings)
        self.planned = planned_evaluations(settings, self.n_models, scale_search)
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None
        # Where the search is: "start", "scale grid", "scale beside", "cma" or "done".
        self._step = "scale grid" if scale_search else "start"
        self._asked: list[Candidate] | None = None
        self._scored_scales: dict[float, Evaluation] = {}
        self._beside: list[float] = []
        self._scale_hits: list[BoundHit] = []
        self.common_scale = 1.0
        self.scaled_start: list[float] | None = None
        self._lower = self._upper = 0.0
        self._to_weights: Callable[[Sequence[float]], list[float]] | None = None
        self._es: cma.CMAEvolutionStrategy | None = None
        self._xs: list[np.ndarray] = []
        self._rng_state: tuple | None = None
        self._worst: float | None = None

    @property
    def done(self) -> bool:
        return self._step == "done"

    def ask(self) -> list[Candidate]:
        """The next batch of candidates; empty when the search is over."""
        if self._asked is not None:
            raise RuntimeError("tell() the evaluations of the last batch before asking again")
        if self._step == "start":
            weights, phase = [self.start], "start"
        elif self._step == "scale grid":
            weights, phase = self._scaled(scale_grid(self.settings)), "scale"
        elif self._step == "scale beside":
            weights, phase = self._scaled(self._beside), "scale"
        elif self._step == "cma" and not self._cma_over():
            self._xs = self._es.ask()
            # Objectives may draw from NumPy's global RNG, which CMA-ES also uses;
            # tell() restores it, which keeps the candidates identical on resume.
            self._rng_state = np.random.get_state()
            weights, phase = [self._to_weights(x) for x in self._xs], "cma"
        else:
            self._step = "done"
            return []
        first = len(self.history)
        self._asked = [
            Candidate(first + k, [float(v) for v in w], "start" if first + k == 0 else phase)
            for k, w in enumerate(weights)
        ]
        return list(self._asked)

    def tell(self, evaluations: Sequence[Evaluation]) -> list[Evaluation]:
        """Take the evaluations of the last batch (in any order); return those that
        improved on the best so far, in candidate order."""
        if self._asked is None:
            raise RuntimeError("ask() for a batch before telling its evaluations")
        by_index = {evaluation.index: evaluation for evaluation in evaluations}
        missing = [c.index for c in self._asked if c.index not in by_index]
        if missing:
            raise ValueError(f"no evaluation of candidate(s) {missing}")
        batch = [by_index[c.index] for c in self._asked]
        self._asked = None
        improved = []
        for evaluation in batch:
            self.history.append(evaluation)
            if self._better(evaluation):
                self.best = evaluation
                improved.append(evaluation)
        # The start alone may fail; the start and the first batch after it may not.
        if len(self.history) > 1 and not any(e.ok for e in self.history):
            first_error = next(e for e in self.history if not e.ok)
            raise AllCandidatesFailedError(
                f"every candidate failed; the first error was:\n{first_error.error}"
            )
        if self._step == "start":
            self._begin_cma(1.0)
        elif self._step == "scale grid":
            self._scored_scales = dict(zip(scale_grid(self.settings), batch, strict=True))
            self._beside = self._beside_best_scale()
            self._step = "scale beside"
        elif self._step == "scale beside":
            self._scored_scales.update(zip(self._beside, batch, strict=True))
            self._begin_cma(self._best_scale())
        else:
            self._tell_cma(batch)
        return improved

    def result(self) -> SearchResult:
        """The start, the best, every evaluation, and the bests on an edge of the box."""
        if self.scaled_start is None:
            raise RuntimeError("the search has not reached its per-model step")
        best = self.best or self.history[0]
        hits = self._scale_hits + _bound_hits(
            best.weights, self.names, self.settings, self.scaled_start, self._lower, self._upper
        )
        return SearchResult(self.history[0], best, list(self.history), hits)

    # --- the steps ---------------------------------------------------------------

    def _scaled(self, common_scales: Sequence[float]) -> list[list[float]]:
        return [[s * w for w in self.start] for s in common_scales]

    def _better(self, evaluation: Evaluation) -> bool:
        return evaluation.ok and (
            self.best is None or is_better(evaluation.score, self.best.score, self.maximize)
        )

    def _beside_best_scale(self) -> list[float]:
        """Two more common scales beside the best of the grid."""
        ordered = sorted(self._scored_scales)
        best = self._best_scale()
        at = ordered.index(best)
        neighbours = [ordered[j] for j in (at - 1, at + 1) if 0 <= j < len(ordered)]
        if len(neighbours) == 2:  # the geometric midpoints on either side
            return [math.sqrt(best * n) for n in neighbours]
        # At the edge of the range: two points towards the one neighbour, so 9 in all.
        (n,) = neighbours
        return [best ** (2 / 3) * n ** (1 / 3), best ** (1 / 3) * n ** (2 / 3)]

    def _best_scale(self) -> float:
        best, best_score = 1.0, None
        for common_scale, evaluation in self._scored_scales.items():
            if evaluation.ok and is_better(evaluation.score, best_score, self.maximize):
                best, best_score = common_scale, evaluation.score
        return best

    def _begin_cma(self, common_scale: float) -> None:
        """Step 2 from ``common_scale`` times the start (1: no scale search)."""
        settings = self.settings
        if self.scale_search:
            for side, edge, widen in (
                ("lower", settings.scale_min, f"--scale-min {settings.scale_min / 4:g}"),
                ("upper", settings.scale_max, f"--scale-max {settings.scale_max * 4:g}"),
            ):
                if common_scale == edge:
                    self._scale_hits.append(
                        BoundHit("common scale", common_scale, side, edge, widen)
                    )
            LOG.info("best common scale of the start weights: %.4g", common_scale)
        self.common_scale = common_scale
        self.scaled_start = [common_scale * w for w in self.start]
        self._lower, self._upper, self._to_weights = _box(settings, self.scaled_start)
        x0 = (
            _clip(self.scaled_start, self._lower, self._upper)
            if settings.absolute
            else [1.0] * self.n_models
        )
        import cma

        self._es = cma.CMAEvolutionStrategy(
            x0,
            settings.sigma0,
            {
                "bounds": [self._lower, self._upper],
                "seed": settings.seed,
                "verbose": -9,
                "popsize": self.popsize,
            },
        )
        self._step = "cma"

    def _cma_over(self) -> bool:
        return len(self.history) + self.popsize > self.settings.budget or self._es.stop()

    def _tell_cma(self, batch: list[Evaluation]) -> None:
        np.random.set_state(self._rng_state)
        ok_values = [self._minimised(e, 0.0) for e in batch if e.ok]
        if ok_values:
            self._worst = max(ok_values) if self._worst is None else max(self._worst, *ok_values)
        if self._worst is None:  # nothing in this search step has succeeded yet
            self._worst = max(self._minimised(e, 0.0) for e in self.history if e.ok)
        worst = self._worst
        self._es.tell(self._xs, [self._minimised(e, worst + 1.0 + abs(worst)) for e in batch])

    def _minimised(self, evaluation: Evaluation, penalty: float) -> float:
        """The score as CMA-ES minimises it; ``penalty`` for a failed evaluation."""
        if not evaluation.ok:
            return penalty
        return -evaluation.score if self.maximize else evaluation.score


def _box(
    settings: SearchSettings, scaled_start: list[float]
) -> tuple[float, float, Callable[[Sequence[float]], list[float]]]:
    """CMA-ES bounds and the map from its coordinates to weights."""
    if settings.absolute:
        return settings.lower, settings.upper, lambda x: [float(v) for v in x]
    return (
        settings.lower_factor,
        settings.upper_factor,
        lambda x: [float(v) * s for v, s in zip(x, scaled_start, strict=True)],
    )


def _clip(values: list[float], lower: float, upper: float) -> list[float]:
    return [min(max(v, lower), upper) for v in values]


def _bound_hits(
    weights: list[float],
    names: list[str],
    settings: SearchSettings,
    scaled_start: list[float],
    lower: float,
    upper: float,
) -> list[BoundHit]:
    """The models whose best weight is near an edge of its box.

    Near: within ``_ON_BOUND`` of the box's width, measured on a log scale for the
    relative box (weights act multiplicatively: 0.6 is as far from 0.5 as 3.6 from 3).
    """
    hits = []
    for name, weight, s in zip(names, weights, scaled_start, strict=True):
        if settings.absolute:
            position, edges = weight, {"lower": lower, "upper": upper}
        else:
            position = math.log(max(weight / s, 1e-300))
            edges = {"lower": math.log(lower), "upper": math.log(upper)}
        width = edges["upper"] - edges["lower"]
        for factor_side, edge in edges.items():
            if abs(position - edge) <= _ON_BOUND * width:
                bound = edge if settings.absolute else math.exp(edge) * s
                # A negative start flips which factor bounds which side of the weight.
                side = factor_side if settings.absolute or s > 0 else _other(factor_side)
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
