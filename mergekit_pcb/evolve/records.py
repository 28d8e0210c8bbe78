"""What the evolver records of a scored candidate: one row of its ``history.jsonl``.

The scoring itself (timing, a failure recorded instead of raised) is the tuner's
:func:`~mergekit_pcb.tune.records.evaluate_candidate`; this module gives it the
evolver's candidate (:class:`Scored`) and record (:class:`EvolveRecord`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mergekit_pcb.evolve.evolver import Candidate
from mergekit_pcb.tune.records import Outcome


@dataclass
class EvolveRecord:
    """One candidate as ``history.jsonl`` keeps it.

    ``generation``, ``individual`` and ``partner`` are None where they do not apply (a
    starting evaluation); ``individual`` and ``partner`` are indices into the config's
    models (the base left out); ``accepted``: the offspring replaced the individual.
    """

    index: int
    generation: int | None
    individual: int | None
    partner: int | None
    accepted: bool
    score: float | None
    seconds: float
    objective_seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EvolveRecord:
        """A row read back; TypeError for a row with other keys."""
        return cls(**row)

    def matches(self, candidate: Candidate) -> bool:
        """Whether this row records ``candidate`` (the same offspring asked for)."""
        return (self.generation, self.individual, self.partner) == (
            candidate.generation,
            candidate.individual,
            candidate.partner,
        )


@dataclass(frozen=True)
class Scored:
    """An :class:`~mergekit_pcb.evolve.evolver.Candidate` as the tuner's evaluators see
    it (:class:`~mergekit_pcb.tune.records.Scorable`); recorded as not accepted, which
    the evolution's verdict then sets."""

    candidate: Candidate

    @property
    def index(self) -> int:
        return self.candidate.index

    @property
    def subject(self) -> Candidate:
        return self.candidate

    def recorded(self, outcome: Outcome) -> EvolveRecord:
        c = self.candidate
        return EvolveRecord(
            index=c.index,
            generation=c.generation,
            individual=c.individual,
            partner=c.partner,
            accepted=False,
            score=outcome.score,
            seconds=outcome.seconds,
            objective_seconds=outcome.objective_seconds,
            error=outcome.error,
        )
