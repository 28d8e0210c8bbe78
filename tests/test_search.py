"""The search (``search.py``, run by ``driver.py``): a common scale first, then CMA-ES in a
box relative to it; ask/tell by hand; failures; replay and extension of a history."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from mergekit_pcb.tune.records import Evaluation
from mergekit_pcb.tune.search import (
    SCALE_EVALUATIONS,
    AllCandidatesFailedError,
    SearchSettings,
    WeightSearch,
    planned_evaluations,
    scale_grid,
    start_weights,
)
from tests.search_helpers import NAMES, Bowl, log_distance, run_test_search, trace

SPREAD = (1.0, 1.15, 0.85)


@pytest.mark.parametrize("scale", [0.3, 4.0])
@pytest.mark.parametrize("start", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_default_search_finds_an_optimum_far_from_the_start(tmp_path, scale, start):
    optimum = [scale * s * w for s, w in zip(SPREAD, start, strict=True)]
    result = run_test_search(
        tmp_path,
        log_distance(optimum),
        SearchSettings(),
        n_models=3,
        start=start,
        model_names=NAMES,
    )
    assert len(result.history) <= SearchSettings().budget
    assert result.start.weights == list(start)
    for found, wanted in zip(result.best.weights, optimum, strict=True):
        assert abs(math.log(found / wanted)) < 0.05, (result.best.weights, optimum)
    assert result.on_bound == []


def test_the_papers_fixed_box_misses_it(tmp_path):
    """The old default (absolute [0.5, 3] from 1.0) cannot reach a scale of 0.3."""
    optimum = [0.3 * s for s in SPREAD]
    result = run_test_search(
        tmp_path,
        log_distance(optimum),
        SearchSettings(lower=0.5, upper=3.0),
        n_models=3,
        start=(1.0, 1.0, 1.0),
        model_names=NAMES,
    )
    assert all(w >= 0.5 for w in result.best.weights)
    assert {hit.side for hit in result.on_bound} == {"lower"}
    assert {hit.widen for hit in result.on_bound} == {"--lower -2"}


def test_scale_grid_is_logarithmic_and_starts_at_one():
    assert scale_grid(SearchSettings()) == pytest.approx(
        [1.0, 0.125, 0.25, 0.5, 2.0, 4.0, 8.0], rel=1e-12
    )


def test_the_first_evaluations_are_the_scale_search(tmp_path):
    result = run_test_search(
        tmp_path,
        log_distance([2.0, 2.0, 2.0]),
        SearchSettings(budget=30),
        n_models=3,
        start=(1.0, 1.0, 1.0),
        model_names=NAMES,
    )
    phases = [e.phase for e in result.history]
    assert phases[:SCALE_EVALUATIONS] == ["start"] + ["scale"] * (SCALE_EVALUATIONS - 1)
    assert set(phases[SCALE_EVALUATIONS:]) == {"cma"}
    scales = [e.weights[0] for e in result.history[:7]]
    assert scales == pytest.approx([1.0, 0.125, 0.25, 0.5, 2.0, 4.0, 8.0])
    # the best grid point is 2: its geometric midpoints with 1 and 4 come next
    assert [e.weights[0] for e in result.history[7:9]] == pytest.approx([2**0.5, 8**0.5])


def test_a_best_on_a_bound_is_reported_with_the_option_that_widens_it(tmp_path):
    optimum = [40.0, 46.0, 34.0]  # beyond the scale range and the box around it
    result = run_test_search(
        tmp_path,
        log_distance(optimum),
        SearchSettings(),
        n_models=3,
        start=(1.0, 1.0, 1.0),
        model_names=NAMES,
    )
    hits = {(hit.what, hit.side): hit for hit in result.on_bound}
    assert hits[("common scale", "upper")].widen == "--scale-max 32"
    assert hits[("common scale", "upper")].value == 8.0
    assert ("code", "upper") in hits and hits[("code", "upper")].widen == "--upper-factor 6"
    assert hits[("code", "upper")].bound == pytest.approx(24.0)
    summary_row = json.loads(json.dumps(hits[("code", "upper")].__dict__))
    assert summary_row["side"] == "upper"
    assert "widen it with --upper-factor 6" in hits[("code", "upper")].message()


def test_a_zero_start_needs_absolute_bounds(tmp_path):
    with pytest.raises(ValueError, match="start weight of code is 0"):
        run_test_search(
            tmp_path,
            log_distance([1.0, 1.0, 1.0]),
            SearchSettings(),
            n_models=3,
            start=(1.0, 0.0, 1.0),
            model_names=NAMES,
        )


def test_the_start_is_the_settings_then_the_configs_weights():
    names = list(NAMES)
    assert start_weights(SearchSettings(start=0.5), [1.0, 3.0, 2.0], names) == [0.5] * 3
    assert start_weights(SearchSettings(), None, names) == [1.0] * 3
    assert start_weights(SearchSettings(), [1, 2, 3], names) == [1.0, 2.0, 3.0]
    absolute = SearchSettings(lower=-1.0, upper=1.0)
    assert start_weights(absolute, [0.0, 0.5, 0.0], names) == [0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="got 2 start weights for 3 models"):
        start_weights(SearchSettings(), [1.0, 1.0], names)
    with pytest.raises(ValueError, match="the start weight of code, chat is 0"):
        start_weights(SearchSettings(), [1.0, 0.0, 0.0], names)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lower": 0.5}, "give both --lower and --upper"),
        ({"lower_factor": 1.5}, "must contain the start"),
        ({"scale_min": 2.0}, "scale range must contain 1"),
        ({"sigma0": 0}, "sigma0 must be positive"),
        ({"seed": 0}, "seed must be a positive integer"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**settings)


def test_a_budget_without_room_for_one_generation_is_refused():
    # 3 models: CMA-ES's default population is 4 + int(3 ln 3) = 7.
    with pytest.raises(
        ValueError,
        match=r"budget 7 is too small: the starting point and one generation of 7 candidates "
        r"need 8 evaluations",
    ):
        planned_evaluations(SearchSettings(budget=7), 3, scale_search=False)
    # The scale search (9) and two whole generations of 7 fit in 23 of 24.
    assert planned_evaluations(SearchSettings(budget=24), 3, scale_search=True) == 23


def test_a_rerun_replays_the_history_and_a_larger_budget_extends_it(tmp_path, caplog):
    optimum = [0.7, 0.8, 0.6]

    def search(out, budget):
        return run_test_search(
            out,
            log_distance(optimum),
            SearchSettings(budget=budget),
            n_models=3,
            start=(1.0, 1.0, 1.0),
            model_names=NAMES,
        )

    straight = search(tmp_path / "straight", 40)
    first = search(tmp_path / "run", 25)
    assert first.resumed == 0
    again = search(tmp_path / "run", 25)
    assert again.resumed == len(first.history)
    assert [e.weights for e in again.history] == [e.weights for e in first.history]
    with caplog.at_level(logging.INFO, logger="mergekit_pcb"):
        extended = search(tmp_path / "run", 40)
    assert extended.resumed == len(first.history)
    assert [(e.weights, e.score) for e in extended.history] == [
        (e.weights, e.score) for e in straight.history
    ]
    assert f"resuming: {len(first.history)} evaluations from history.jsonl" in caplog.text


def _bowl_settings(budget: int, **settings) -> SearchSettings:
    return SearchSettings(budget=budget, popsize=4, seed=7, **settings)


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_larger_budget_extends_a_run_as_if_it_had_been_given_at_once(tmp_path, interrupted):
    straight = run_test_search(tmp_path / "straight", Bowl((1.3, 0.7)), _bowl_settings(29))
    assert len(straight.history) == 29  # the scale search (9) and 5 generations of 4

    out = tmp_path / "extended"
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            run_test_search(out, Bowl((1.3, 0.7), stop_at=11), _bowl_settings(13))
        done = 10
    else:
        done = len(run_test_search(out, Bowl((1.3, 0.7)), _bowl_settings(13)).history)
        assert done == 13
    again = Bowl((1.3, 0.7))
    extended = run_test_search(out, again, _bowl_settings(29))
    assert again.calls == 29 - done  # nothing scored twice
    assert trace(extended) == trace(straight)


def test_the_result_counts_only_the_replayed_evaluations(tmp_path):
    assert run_test_search(tmp_path, Bowl((1.3, 0.7)), _bowl_settings(13)).resumed == 0
    assert run_test_search(tmp_path, Bowl((1.3, 0.7)), _bowl_settings(17)).resumed == 13


def _failure_settings(budget: int) -> SearchSettings:
    return SearchSettings(budget=budget, popsize=4, seed=5, scale_search=False)


def test_failing_candidates_score_worst_and_the_search_goes_on(tmp_path, caplog):
    def evaluate(c, timings):
        if c[0] > 1.4:
            raise RuntimeError("objective exploded")
        if c[1] > 2.5:
            return math.nan
        return -((c[0] - 1.2) ** 2) - (c[1] - 0.9) ** 2

    result = run_test_search(tmp_path, evaluate, _failure_settings(41), maximize=True)
    failed = [e for e in result.history if not e.ok]
    assert failed, "the bounds make some candidates fail"
    assert all("objective exploded" in e.error or "not a finite number" in e.error for e in failed)
    assert len(result.history) == 41 and result.best.ok
    assert abs(result.best.weights[0] - 1.2) < 0.15
    assert "failed: RuntimeError: objective exploded" in caplog.text


def test_a_run_where_every_candidate_fails_stops_with_the_first_error(tmp_path):
    calls = []

    def evaluate(c, timings):
        calls.append(c)
        raise ValueError(f"bad data file #{len(calls)}")

    with pytest.raises(AllCandidatesFailedError, match=r"(?s)first error was:.*bad data file #1"):
        run_test_search(tmp_path, evaluate, _failure_settings(25), maximize=True)
    assert len(calls) == 5  # the starting point and one generation, then it stops


# --- ask/tell by hand, without a run directory -----------------------------------------


def _scored(candidates, scores) -> list[Evaluation]:
    return [
        Evaluation(c.index, c.weights, score, 0.0, 0.0, phase=c.phase)
        for c, score in zip(candidates, scores, strict=True)
    ]


def _ask_tell(search: WeightSearch, evaluate) -> None:
    while candidates := search.ask():
        search.tell(_scored(candidates, [evaluate(c.weights, {}) for c in candidates]))


def test_ask_tell_by_hand_is_the_search_the_driver_runs(tmp_path):
    settings = _bowl_settings(29)
    by_hand = WeightSearch(settings, [1.0, 1.0], maximize=False, scale_search=True)
    _ask_tell(by_hand, Bowl((1.3, 0.7)))
    driven = run_test_search(tmp_path, Bowl((1.3, 0.7)), settings)
    assert trace(by_hand.result()) == trace(driven)
    assert by_hand.done and by_hand.ask() == []
    assert by_hand.result().best.weights == driven.best.weights
    assert by_hand.result().on_bound == driven.on_bound


def test_the_scale_steps_follow_the_scores_they_are_told():
    settings = SearchSettings(budget=30, popsize=4)
    search = WeightSearch(settings, [2.0, 0.5], maximize=True, scale_search=True)
    grid = search.ask()
    assert [c.index for c in grid] == list(range(7))
    assert [c.phase for c in grid] == ["start"] + ["scale"] * 6
    scales = (1.0, 0.125, 0.25, 0.5, 2.0, 4.0, 8.0)
    assert [w for c in grid for w in c.weights] == pytest.approx(
        [w for s in scales for w in (2.0 * s, 0.5 * s)]
    )
    # Higher is better; the best scale is 1/8, at the edge of the range.
    improved = search.tell(_scored(grid, [1.0, 9.0, 8.0, 7.0, 0.5, 0.2, 0.1]))
    assert [e.index for e in improved] == [0, 1]
    beside = search.ask()
    # Two points towards its one neighbour, 1/4: 2^(-8/3) and 2^(-7/3).
    assert [c.weights[0] / 2.0 for c in beside] == pytest.approx([2 ** (-8 / 3), 2 ** (-7 / 3)])
    assert [c.index for c in beside] == [7, 8]
    assert search.tell(_scored(beside, [8.5, 8.9])) == []
    assert search.common_scale == 0.125
    assert search.scaled_start == pytest.approx([0.25, 0.0625])
    cma_batch = search.ask()
    assert [c.phase for c in cma_batch] == ["cma"] * 4
    for candidate in cma_batch:  # inside [0.5, 3] x the scaled start
        for weight, scaled in zip(candidate.weights, search.scaled_start, strict=True):
            assert 0.5 * scaled <= weight <= 3.0 * scaled


def test_a_batch_may_be_told_in_any_order():
    def run(order) -> list[list[float]]:
        search = WeightSearch(_bowl_settings(21), [1.0, 1.0], maximize=False, scale_search=True)
        bowl = Bowl((1.3, 0.7))
        while candidates := search.ask():
            search.tell(order(_scored(candidates, [bowl(c.weights, {}) for c in candidates])))
        return [e.weights for e in search.history]

    assert run(lambda batch: batch[::-1]) == run(lambda batch: batch)


def test_ask_and_tell_take_turns():
    search = WeightSearch(_bowl_settings(13), [1.0, 1.0], maximize=False, scale_search=False)
    with pytest.raises(RuntimeError, match="ask"):
        search.tell([])
    [start] = search.ask()
    assert (start.index, start.phase, start.weights) == (0, "start", [1.0, 1.0])
    with pytest.raises(RuntimeError, match="tell"):
        search.ask()
    with pytest.raises(ValueError, match=r"no evaluation of candidate\(s\) \[0\]"):
        search.tell([])
    with pytest.raises(RuntimeError, match="per-model step"):
        WeightSearch(_bowl_settings(13), [1.0, 1.0], maximize=False, scale_search=True).result()


def test_an_objective_drawing_from_numpys_rng_does_not_move_the_candidates(tmp_path):
    """CMA-ES samples from NumPy's global RNG; an objective that draws from it too must
    not change the candidates (else a resumed run, which draws less, would diverge)."""
    quiet_bowl = Bowl((1.3, 0.7))

    def drawing_bowl(weights, timings):
        np.random.random_sample(5)
        return quiet_bowl(weights, timings)

    drawing = run_test_search(tmp_path / "drawing", drawing_bowl, _bowl_settings(29))
    quiet = run_test_search(tmp_path / "quiet", Bowl((1.3, 0.7)), _bowl_settings(29))
    assert trace(drawing) == trace(quiet)
