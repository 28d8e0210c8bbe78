"""The default search: a common scale first, then CMA-ES in a box relative to it."""

from __future__ import annotations

import json
import logging
import math

import pytest

from mergekit_pcb.tune.search import (
    SCALE_EVALUATIONS,
    SearchSettings,
    run_search,
    scale_grid,
)

SPREAD = (1.0, 1.15, 0.85)


def _log_distance(optimum):
    """Squared log-distance to ``optimum`` (lower is better): scale-free, like weights."""

    def evaluate(weights, timings):
        return sum(
            math.log(w / o) ** 2 if w > 0 else 100.0 for w, o in zip(weights, optimum, strict=True)
        )

    return evaluate


def _search(tmp_path, optimum, start=(1.0, 1.0, 1.0), **settings):
    return run_search(
        _log_distance(optimum),
        len(optimum),
        maximize=False,
        out_dir=str(tmp_path),
        identity={"test": "search"},
        settings=SearchSettings(**settings),
        start=list(start),
        model_names=["math", "code", "chat"][: len(optimum)],
        quiet=True,
    )


@pytest.mark.parametrize("scale", [0.3, 4.0])
@pytest.mark.parametrize("start", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_default_search_finds_an_optimum_far_from_the_start(tmp_path, scale, start):
    optimum = [scale * s * w for s, w in zip(SPREAD, start, strict=True)]
    result = _search(tmp_path, optimum, start=start)
    assert len(result.history) <= SearchSettings().budget
    assert result.start.weights == list(start)
    for found, wanted in zip(result.best.weights, optimum, strict=True):
        assert abs(math.log(found / wanted)) < 0.05, (result.best.weights, optimum)
    assert result.on_bound == []


def test_the_papers_fixed_box_misses_it(tmp_path):
    """The old default (absolute [0.5, 3] from 1.0) cannot reach a scale of 0.3."""
    optimum = [0.3 * s for s in SPREAD]
    result = _search(tmp_path, optimum, start=(1.0, 1.0, 1.0), lower=0.5, upper=3.0)
    assert all(w >= 0.5 for w in result.best.weights)
    assert {hit.side for hit in result.on_bound} == {"lower"}
    assert {hit.widen for hit in result.on_bound} == {"--lower -2"}


def test_scale_grid_is_logarithmic_and_starts_at_one():
    assert scale_grid(SearchSettings()) == pytest.approx(
        [1.0, 0.125, 0.25, 0.5, 2.0, 4.0, 8.0], rel=1e-12
    )


def test_the_first_evaluations_are_the_scale_search(tmp_path):
    result = _search(tmp_path, [2.0, 2.0, 2.0], budget=30)
    phases = [e.phase for e in result.history]
    assert phases[:SCALE_EVALUATIONS] == ["start"] + ["scale"] * (SCALE_EVALUATIONS - 1)
    assert set(phases[SCALE_EVALUATIONS:]) == {"cma"}
    scales = [e.weights[0] for e in result.history[:7]]
    assert scales == pytest.approx([1.0, 0.125, 0.25, 0.5, 2.0, 4.0, 8.0])
    # the best grid point is 2: its geometric midpoints with 1 and 4 come next
    assert [e.weights[0] for e in result.history[7:9]] == pytest.approx([2**0.5, 8**0.5])


def test_a_best_on_a_bound_is_reported_with_the_option_that_widens_it(tmp_path):
    optimum = [40.0, 46.0, 34.0]  # beyond the scale range and the box around it
    result = _search(tmp_path, optimum)
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
        _search(tmp_path, [1.0, 1.0, 1.0], start=(1.0, 0.0, 1.0))


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


def test_a_rerun_replays_the_history_and_a_larger_budget_extends_it(tmp_path, caplog):
    optimum = [0.7, 0.8, 0.6]
    straight = _search(tmp_path / "straight", optimum, budget=40)
    first = _search(tmp_path / "run", optimum, budget=25)
    assert first.resumed == 0
    again = _search(tmp_path / "run", optimum, budget=25)
    assert again.resumed == len(first.history)
    assert [e.weights for e in again.history] == [e.weights for e in first.history]
    with caplog.at_level(logging.INFO, logger="mergekit_pcb"):
        extended = _search(tmp_path / "run", optimum, budget=40)
    assert extended.resumed == len(first.history)
    assert [(e.weights, e.score) for e in extended.history] == [
        (e.weights, e.score) for e in straight.history
    ]
    assert f"resuming: {len(first.history)} evaluations from history.jsonl" in caplog.text
