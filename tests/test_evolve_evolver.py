"""The evolution's logic with a synthetic scorer: a quadratic in the individuals' tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_pcb.evolve import offspring
from mergekit_pcb.evolve.evolver import Candidate, Evolution, drive

SHAPES = {"a": (6, 5), "b": (17,)}


def _population(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in range(n)]


def _target() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return {k: 0.3 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _loss(model: dict[str, torch.Tensor]) -> float:
    """A quadratic: squared distance to a fixed target."""
    target = _target()
    return sum(float((model[k] - target[k]).pow(2).sum()) for k in SHAPES)


def _mean(members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([m[k] for m in members]).mean(0) for k in SHAPES}


def _child(key: offspring.OffspringKey, population) -> dict[str, torch.Tensor]:
    parent, partner = population[key.individual], population[key.partner]
    return {k: key.tensor(k, parent[k], partner[k]) for k in SHAPES}


def _run_merged(n=4, generations=5, maximize=False, seed=7, **kw):
    population = _population(n)
    evolution = Evolution(n, generations=generations, seed=seed, maximize=maximize, **kw)
    sign = -1.0 if maximize else 1.0
    children: dict[int, dict] = {}

    def score(candidate: Candidate) -> float:
        members = list(population)
        if candidate.key is not None:
            children[candidate.index] = _child(candidate.key, population)
            members[candidate.individual] = children[candidate.index]
        return sign * _loss(_mean(members))

    def accept(candidate: Candidate) -> None:
        population[candidate.individual] = children[candidate.index]

    history = drive(evolution, score, accept)
    return evolution, history, population


@pytest.mark.parametrize("maximize", [False, True])
def test_merged_mode_accepts_exactly_the_improving_offspring(maximize):
    evolution, history, population = _run_merged(maximize=maximize)
    assert len(history) == 1 + 5 * 4 == evolution.total
    assert history[0].candidate.key is None and not history[0].accepted
    best = history[0].score
    for judgement in history[1:]:
        improves = judgement.score > best if maximize else judgement.score < best
        assert judgement.accepted == improves
        if improves:
            best = judgement.score
    assert evolution.score == best
    assert any(j.accepted for j in history) and not all(j.accepted for j in history[1:])
    # The final population's merge scores the best score (selection kept what it judged).
    sign = -1.0 if maximize else 1.0
    assert sign * _loss(_mean(population)) == pytest.approx(best, rel=0, abs=1e-9)


def test_merged_mode_visits_every_individual_once_per_generation_with_another_partner():
    _, history, _ = _run_merged(n=5, generations=3)
    for g in range(3):
        rows = [j.candidate for j in history if j.candidate.generation == g]
        assert sorted(c.individual for c in rows) == list(range(5))
        assert [c.individual for c in rows] == offspring.generation_order(7, g, 5)
        assert all(c.partner != c.individual for c in rows)
        assert all(c.key.partner == c.partner and c.key.generation == g for c in rows)
    assert [j.candidate.index for j in history] == list(range(len(history)))


def test_the_run_is_deterministic():
    first, second = _run_merged()[1], _run_merged()[1]
    assert first == second
    other = _run_merged(seed=8)[1]
    assert [j.candidate for j in other] != [j.candidate for j in first]


def test_failed_scores_are_never_better():
    evolution = Evolution(3, generations=2, maximize=True)
    start = evolution.ask()
    evolution.tell(start, 1.0)
    scores = iter([math.nan, None, 2.0, math.inf, 1.5, 3.0])
    accepted = []
    while (candidate := evolution.ask()) is not None:
        accepted.append(evolution.tell(candidate, next(scores)).accepted)
    assert accepted == [False, False, True, False, False, True]
    assert evolution.score == 3.0


def test_a_failed_start_is_beaten_by_any_score():
    evolution = Evolution(2, generations=1, maximize=False)
    evolution.tell(evolution.ask(), None)
    assert evolution.tell(evolution.ask(), 123.0).accepted


def test_budget_and_ask_tell_contract():
    evolution = Evolution(3, generations=15, budget=5)
    assert evolution.total == 5
    candidate = evolution.ask()
    with pytest.raises(RuntimeError, match="has not been told"):
        evolution.ask()
    with pytest.raises(ValueError, match="not the one asked for"):
        evolution.tell(Candidate(9, 0, 0, 1, None), 1.0)
    evolution.tell(candidate, 1.0)
    count = 1
    while (candidate := evolution.ask()) is not None:
        evolution.tell(candidate, 0.0)
        count += 1
    assert count == 5 and evolution.done


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        Evolution(1)
    with pytest.raises(ValueError, match="mode must be"):
        Evolution(3, mode="both")
    with pytest.raises(ValueError, match="cr must be"):
        Evolution(3, cr=2.0)


def _expected_individual_partner(evolution: Evolution, g: int, i: int) -> int:
    """The spec's rule, written out: with probability 0.5 / (G - g) + 0.5 a uniform other,
    else the best-scoring other."""
    p = 0.5 / (evolution.generations - g) + 0.5
    if offspring.uniform(evolution.seed, g, i) < p:
        return offspring.uniform_partner(evolution.seed, g, i, evolution.n)
    others = [j for j in range(evolution.n) if j != i]
    sign = 1 if evolution.maximize else -1
    return max(others, key=lambda j: (sign * evolution.scores[j], -j))


def test_individual_mode():
    n, generations = 4, 6
    population = _population(n, seed=3)
    evolution = Evolution(n, generations=generations, seed=2, maximize=False, mode="individual")
    children: dict[int, dict] = {}
    told = []
    while (candidate := evolution.ask()) is not None:
        if candidate.key is None:
            score = _loss(population[candidate.individual])
        else:
            assert candidate.partner == _expected_individual_partner(
                evolution, candidate.generation, candidate.individual
            )
            children[candidate.index] = _child(candidate.key, population)
            score = _loss(children[candidate.index])
        before = evolution.scores[candidate.individual]
        judgement = evolution.tell(candidate, score)
        if candidate.key is not None:
            assert judgement.accepted == (score < before)
        if judgement.accepted:
            population[candidate.individual] = children[candidate.index]
        told.append(candidate)
    assert len(told) == n + generations * n
    # Starts first, then every individual in order each generation.
    assert [c.individual for c in told[:n]] == list(range(n))
    assert [c.individual for c in told[n:]] == list(range(n)) * generations
    for i in range(n):
        assert evolution.scores[i] == pytest.approx(_loss(population[i]), abs=1e-9)
    best = evolution.best_individual
    assert evolution.scores[best] == min(evolution.scores)
    # The late generations exploit: the best-other rule was used at least once.
    used_best = sum(
        offspring.uniform(2, c.generation, c.individual) >= 0.5 / (generations - c.generation) + 0.5
        for c in told[n:]
    )
    assert used_best > 0
