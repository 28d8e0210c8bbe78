"""What a search records of a scored candidate, and how candidates get scored.

Shared by every command that searches by scoring candidates one by one and keeping a
resumable history (``mergekit-pcb-tune`` and any other search over merges):

* :func:`is_better` and :func:`best_of`: the one definition of "better";
* :class:`Outcome`: how scoring one candidate went (score or error, and timings),
  whatever the candidate is; :meth:`Outcome.failed` is the one way a failure is
  recorded, and :func:`evaluate_candidate` the one way a score is taken (timed, an
  exception or a non-finite score turned into a failure, Ctrl-C let through);
* :class:`Scorable`: what a candidate must offer the evaluators (its index, the
  ``subject`` the evaluate function scores, and its record of an outcome), and
  :class:`BatchEvaluator`, :class:`SerialEvaluator` over such candidates.

The tuner's own candidate and record are :class:`Candidate` (one weight per model) and
:class:`Evaluation`, one ``history.jsonl`` row: ``index``, ``weights``, ``score``,
``seconds``, ``objective_seconds``, ``error``, ``phase``. Another command defines its own
pair (its candidate's ``recorded`` builds its row from an :class:`Outcome`) and reuses
the rest.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

#: What the evaluate function scores (the tuner's: the weights) ...
Subject = TypeVar("Subject")
#: ... and what a scored candidate is recorded as (the tuner's: an Evaluation).
Record = TypeVar("Record")
Record_co = TypeVar("Record_co", covariant=True)
Candidate_contra = TypeVar("Candidate_contra", contravariant=True)

#: ``evaluate(subject, timings) -> score``; it may record ``timings["objective"]``, the
#: seconds of the objective alone.
Evaluate = Callable[[Subject, dict[str, float]], float]


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
class Outcome:
    """How scoring one candidate went: its score, or None and the error, and the time.

    ``seconds``: the whole evaluation (for the tuner: writing the candidate into the live
    model and the objective); ``objective_seconds``: the objective alone.
    """

    score: float | None
    seconds: float
    objective_seconds: float = 0.0
    error: str | None = None

    @classmethod
    def failed(cls, error: str, seconds: float, objective_seconds: float = 0.0) -> Outcome:
        """A candidate that could not be scored (``error``: a traceback or a reason)."""
        return cls(None, seconds, objective_seconds, error)


class Scorable(Protocol[Subject, Record_co]):
    """A candidate as the evaluators see it.

    ``index``: its place in the run's history; ``subject``: what the evaluate function
    is given; :meth:`recorded`: its record once scored (or failed).
    """

    @property
    def index(self) -> int: ...

    @property
    def subject(self) -> Subject: ...

    def recorded(self, outcome: Outcome) -> Record_co: ...


@runtime_checkable
class BatchEvaluator(Protocol[Candidate_contra, Record_co]):
    """Scores a batch of independent candidates, yielding each record as it finishes
    (in any order: a parallel evaluator yields them as they come)."""

    def evaluate_batch(self, candidates: Sequence[Candidate_contra]) -> Iterator[Record_co]: ...


def evaluate_candidate(
    evaluate: Evaluate[Subject], candidate: Scorable[Subject, Record]
) -> Record:
    """Score one candidate; an exception or a non-finite score becomes a failed one.

    Ctrl-C (KeyboardInterrupt) is not a failure of the candidate: it goes on up.
    """
    began = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        score = evaluate(candidate.subject, timings)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"objective returned {score!r}, not a finite number")
    except KeyboardInterrupt:
        raise
    except Exception:
        outcome = Outcome.failed(
            traceback.format_exc(),
            time.perf_counter() - began,
            timings.get("objective", 0.0),
        )
    else:
        outcome = Outcome(
            float(score), time.perf_counter() - began, timings.get("objective", 0.0)
        )
    return candidate.recorded(outcome)


class SerialEvaluator(Generic[Subject, Record]):
    """Scores candidates one after another in this process with ``evaluate``."""

    def __init__(self, evaluate: Evaluate[Subject]):
        self.evaluate = evaluate

    def evaluate_batch(
        self, candidates: Sequence[Scorable[Subject, Record]]
    ) -> Iterator[Record]:
        for candidate in candidates:
            yield evaluate_candidate(self.evaluate, candidate)


# --- the tuner's candidate and record -----------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One weight per model to score; ``phase`` says which step of the search asked."""

    index: int
    weights: list[float]
    phase: str = "cma"  # "start", "scale" (the common-scale search) or "cma"

    @property
    def subject(self) -> list[float]:
        return self.weights

    def recorded(self, outcome: Outcome) -> Evaluation:
        return Evaluation(
            index=self.index,
            weights=list(self.weights),
            score=outcome.score,
            seconds=outcome.seconds,
            objective_seconds=outcome.objective_seconds,
            error=outcome.error,
            phase=self.phase,
        )


@dataclass
class Evaluation:
    """One scored candidate of the tuner, and one row of its ``history.jsonl``: its
    weights, score (None if it failed), timings, error and phase."""

    index: int
    weights: list[float]
    score: float | None
    seconds: float
    objective_seconds: float
    error: str | None = None
    phase: str = "cma"

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict[str, Any]:
        """The ``history.jsonl`` row: the fields, in this order."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Evaluation:
        """A row read back; TypeError for a row with other keys."""
        return cls(**row)
