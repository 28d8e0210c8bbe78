"""What a scored candidate records (``records.py``): "better", the one way a score is taken
and a failure recorded, the tuner's history row, and a second command's candidates."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest

from mergekit_pcb.tune.records import (
    BatchEvaluator,
    Candidate,
    Evaluation,
    Outcome,
    SerialEvaluator,
    best_of,
    evaluate_candidate,
    is_better,
)

#: The keys of a ``history.jsonl`` row, in order: existing run directories hold them.
ROW_KEYS = ["index", "weights", "score", "seconds", "objective_seconds", "error", "phase"]


def test_better_is_one_definition_in_both_directions():
    assert is_better(1.0, None, maximize=True) and is_better(1.0, None, maximize=False)
    assert is_better(2.0, 1.0, maximize=True) and not is_better(1.0, 2.0, maximize=True)
    assert is_better(1.0, 2.0, maximize=False) and not is_better(2.0, 1.0, maximize=False)
    assert not is_better(1.0, 1.0, maximize=True) and not is_better(1.0, 1.0, maximize=False)
    assert best_of([3.0, -1.0, 2.0], maximize=True) == 3.0
    assert best_of([3.0, -1.0, 2.0], maximize=False) == -1.0
    with pytest.raises(ValueError, match="no scores"):
        best_of([], maximize=True)


def test_a_score_is_recorded_with_its_timings():
    def evaluate(weights, timings):
        time.sleep(0.01)
        timings["objective"] = 0.004
        return sum(weights)

    candidate = Candidate(3, [0.5, 2.0], "scale")
    evaluation = evaluate_candidate(evaluate, candidate)
    assert (evaluation.index, evaluation.weights, evaluation.phase) == (3, [0.5, 2.0], "scale")
    assert evaluation.score == 2.5 and isinstance(evaluation.score, float)
    assert evaluation.ok and evaluation.error is None
    assert evaluation.objective_seconds == 0.004
    assert evaluation.seconds >= 0.01
    assert evaluation.weights is not candidate.weights  # the record owns its weights


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf, "0.5", None])
def test_a_score_that_is_not_a_finite_number_fails_the_candidate(score):
    evaluation = evaluate_candidate(lambda weights, timings: score, Candidate(0, [1.0]))
    assert not evaluation.ok and evaluation.score is None
    assert f"objective returned {score!r}, not a finite number" in evaluation.error


def test_an_exception_fails_the_candidate_with_its_traceback_and_timings():
    def evaluate(weights, timings):
        timings["objective"] = 0.25
        raise RuntimeError("out of memory in layer 3")

    evaluation = evaluate_candidate(evaluate, Candidate(1, [1.0, 2.0], "cma"))
    assert not evaluation.ok and evaluation.score is None
    assert evaluation.error.startswith("Traceback")
    assert evaluation.error.strip().splitlines()[-1] == "RuntimeError: out of memory in layer 3"
    assert evaluation.objective_seconds == 0.25 and evaluation.seconds >= 0


def test_ctrl_c_is_not_a_failed_candidate():
    def evaluate(weights, timings):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_candidate(evaluate, Candidate(0, [1.0]))


def test_a_failure_without_a_score_is_recorded_the_same_way():
    """A Ray worker that died has no objective timing: the failed outcome, recorded."""
    evaluation = Candidate(5, [1.5], "cma").recorded(Outcome.failed("WorkerDiedError: x", 2.0))
    assert evaluation == Evaluation(5, [1.5], None, 2.0, 0.0, "WorkerDiedError: x", "cma")
    assert not evaluation.ok


def test_a_history_row_keeps_its_keys_and_reads_back():
    evaluation = Evaluation(2, [1.0, 0.5], 0.25, 1.5, 1.25, None, "scale")
    row = evaluation.to_row()
    assert list(row) == ROW_KEYS
    assert row == {
        "index": 2,
        "weights": [1.0, 0.5],
        "score": 0.25,
        "seconds": 1.5,
        "objective_seconds": 1.25,
        "error": None,
        "phase": "scale",
    }
    assert Evaluation.from_row(row) == evaluation
    # A row written before phases were recorded reads as a CMA-ES candidate.
    old = {k: v for k, v in row.items() if k != "phase"}
    assert Evaluation.from_row(old).phase == "cma"
    with pytest.raises(TypeError):
        Evaluation.from_row({**row, "coefficients": [1.0]})


def test_the_serial_evaluator_scores_a_batch_in_order():
    evaluator = SerialEvaluator(lambda weights, timings: weights[0] * 10)
    assert isinstance(evaluator, BatchEvaluator)
    batch = [Candidate(i, [float(i)]) for i in range(3)]
    assert [(e.index, e.score) for e in evaluator.evaluate_batch(batch)] == [
        (0, 0.0),
        (1, 10.0),
        (2, 20.0),
    ]


# --- another command's candidates: not weights ------------------------------------


@dataclass(frozen=True)
class _Pairing:
    """A candidate of another search: two fine-tunes crossed, judged through a merge."""

    index: int
    generation: int
    individual: int
    partner: int

    @property
    def subject(self) -> tuple[int, int]:
        return self.individual, self.partner

    def recorded(self, outcome: Outcome) -> dict:
        return {
            "index": self.index,
            "generation": self.generation,
            "individual": self.individual,
            "partner": self.partner,
            "accepted": None,
            "score": outcome.score,
            "seconds": outcome.seconds,
            "error": outcome.error,
        }


def test_another_commands_candidates_are_scored_and_fail_the_same_way():
    def judge(pair, timings):
        individual, partner = pair
        if partner == individual:
            raise ValueError("a model crossed with itself")
        return individual + partner / 10

    evaluator = SerialEvaluator(judge)
    rows = list(evaluator.evaluate_batch([_Pairing(0, 1, 2, 3), _Pairing(1, 1, 4, 4)]))
    assert [(r["index"], r["individual"], r["partner"], r["score"]) for r in rows] == [
        (0, 2, 3, 2.3),
        (1, 4, 4, None),
    ]
    assert rows[0]["error"] is None
    assert rows[1]["error"].strip().endswith("ValueError: a model crossed with itself")
