"""The evolution itself: which offspring to judge next, and which to keep.

Pure logic over scores: no tensors, no models. The caller owns the loop, as with
pycma's ask/tell: :meth:`Evolution.ask` names the next candidate, the caller makes and
scores it, :meth:`Evolution.tell` says whether it is kept; :func:`drive` is that loop
for callers with nothing to add.

Two modes:

* ``merged`` (the default; the population judged through its merge). The first
  candidate is the population as it is. Then, for each generation, every individual
  in a seeded random order: a partner uniform among the others, the offspring of the
  two (:class:`~mergekit_pcb.evolve.offspring.OffspringKey`), and the merge of the
  population with the individual replaced by its offspring is scored; the offspring
  replaces the individual when that score is strictly better than the best so far.
  ``1 + generations * n`` evaluations in all.
* ``individual`` (each individual judged alone, no merge). The first ``n`` candidates
  score each individual. Then, for each generation ``g`` of ``G``, every individual in
  order: with probability ``0.5 / (G - g) + 0.5`` a partner uniform among the others,
  else the best-scoring other (exploration early, exploitation late); the offspring
  replaces the individual when it scores strictly better than that individual. The
  result is the best individual. ``n + generations * n`` evaluations.

"Better" is :func:`~mergekit_pcb.tune.records.is_better` for the objective's direction
(a loss is minimised). A score that is None or not finite (a failed evaluation) is
never better; selection uses these scores only (the validation objective). Every
random choice is drawn from a stream keyed by the seed and the place it is used
(:mod:`~mergekit_pcb.evolve.offspring`), so a run told the same scores asks for the
same candidates: replaying a recorded history reproduces its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from mergekit_pcb.evolve.offspring import (
    OffspringKey,
    check_rates,
    generation_order,
    uniform,
    uniform_partner,
)
from mergekit_pcb.tune.records import is_better

Mode = Literal["merged", "individual"]
MODES: tuple[Mode, ...] = ("merged", "individual")


@dataclass(frozen=True)
class Candidate:
    """One evaluation to make.

    ``key`` is None for a starting evaluation: the population as it is (``merged``;
    ``individual`` is None) or individual ``individual`` alone (``individual`` mode).
    Otherwise it names the offspring to make and score.
    """

    index: int
    generation: int | None
    individual: int | None
    partner: int | None
    key: OffspringKey | None


@dataclass(frozen=True)
class Judgement:
    """A candidate, its score (None: failed), and whether its offspring was kept."""

    candidate: Candidate
    score: float | None
    accepted: bool


def _usable(score: float | None) -> float | None:
    return score if score is not None and math.isfinite(score) else None


@dataclass
class Evolution:
    """The state of one evolution (see the module); ``n`` individuals, ``n >= 2``."""

    n: int
    generations: int = 15
    f: float = 0.5
    cr: float = 0.5
    seed: int = 0
    maximize: bool = True
    mode: Mode = "merged"
    budget: int | None = None  # at most this many evaluations (None: all of them)
    history: list[Judgement] = field(default_factory=list)
    #: merged: the best score of the population's merge so far (None: no usable score)
    score: float | None = None
    #: individual: each individual's score so far
    scores: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"evolution needs at least two individuals, got {self.n}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        check_rates(self.f, self.cr)
        self.scores = [None] * self.n
        self._pending: Candidate | None = None
        self._candidates = self._generate()

    @property
    def total(self) -> int:
        """Evaluations of the whole run (the budget's cap included)."""
        full = (1 if self.mode == "merged" else self.n) + self.generations * self.n
        return full if self.budget is None else min(full, self.budget)

    @property
    def done(self) -> bool:
        return len(self.history) >= self.total

    def ask(self) -> Candidate | None:
        """The next candidate, or None when the run is over. One at a time: each must be
        told before the next is asked."""
        if self._pending is not None:
            raise RuntimeError(f"candidate {self._pending.index} has not been told yet")
        if self.done:
            return None
        self._pending = next(self._candidates, None)
        return self._pending

    def tell(self, candidate: Candidate, score: float | None) -> Judgement:
        """Record ``candidate``'s score; return whether its offspring is kept."""
        if candidate != self._pending:
            raise ValueError(f"candidate {candidate.index} is not the one asked for")
        self._pending = None
        usable = _usable(score)
        if self.mode == "merged":
            current = self.score
        else:
            assert candidate.individual is not None
            current = self.scores[candidate.individual]
        better = usable is not None and is_better(usable, current, self.maximize)
        if candidate.key is None:  # a starting evaluation: it sets the score to beat
            accepted = False
            better = True
        else:
            accepted = better
        if better:
            if self.mode == "merged":
                self.score = usable
            else:
                self.scores[candidate.individual] = usable
        judgement = Judgement(candidate, score, accepted)
        self.history.append(judgement)
        return judgement

    @property
    def best_individual(self) -> int | None:
        """``individual`` mode: the best-scoring individual (lowest index on a tie)."""
        return self._best_of(range(self.n))

    def _best_of(self, indices) -> int | None:
        best: int | None = None
        for i in indices:
            s = self.scores[i]
            if s is not None and (best is None or is_better(s, self.scores[best], self.maximize)):
                best = i
        return best

    def _generate(self) -> Iterator[Candidate]:
        index = 0
        starts = [None] if self.mode == "merged" else list(range(self.n))
        for individual in starts:
            yield Candidate(index, None, individual, None, None)
            index += 1
        for g in range(self.generations):
            order = (
                generation_order(self.seed, g, self.n)
                if self.mode == "merged"
                else list(range(self.n))
            )
            for i in order:
                partner = self._partner(g, i)
                key = OffspringKey(self.seed, g, i, partner, self.f, self.cr)
                yield Candidate(index, g, i, partner, key)
                index += 1

    def _partner(self, g: int, i: int) -> int:
        uniform_choice = uniform_partner(self.seed, g, i, self.n)
        if self.mode == "merged":
            return uniform_choice
        explore = 0.5 / (self.generations - g) + 0.5
        if uniform(self.seed, g, i) < explore:
            return uniform_choice
        best = self._best_of(j for j in range(self.n) if j != i)
        return uniform_choice if best is None else best


def drive(
    evolution: Evolution,
    score: Callable[[Candidate], float | None],
    accept: Callable[[Candidate], None],
) -> list[Judgement]:
    """Run ``evolution`` to its end: ``score`` each candidate, ``accept`` each kept one.

    ``score(candidate)`` makes the candidate's offspring (``candidate.key``), writes
    the population with it (or, in ``individual`` mode, the offspring alone) into the
    live model and returns the objective; ``accept(candidate)`` makes the offspring
    the individual.
    """
    while (candidate := evolution.ask()) is not None:
        judgement = evolution.tell(candidate, score(candidate))
        if judgement.accepted:
            accept(candidate)
    return evolution.history
