"""The search run on functions of the weights (no models): the one helper the tests share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from mergekit_pcb.tune.driver import run_search
from mergekit_pcb.tune.search import SearchResult, SearchSettings

NAMES = ("math", "code", "chat")


def run_test_search(
    out_dir: str | Path,
    evaluate: Callable[[Sequence[float], dict], float],
    settings: SearchSettings,
    *,
    n_models: int = 2,
    maximize: bool = False,
    start: Sequence[float] | None = None,
    model_names: Sequence[str] | None = None,
) -> SearchResult:
    """``run_search`` in ``out_dir`` as the tuner runs it, without progress bars."""
    return run_search(
        evaluate,
        n_models,
        maximize=maximize,
        out_dir=str(out_dir),
        identity={"test": "search"},
        settings=settings,
        start=None if start is None else list(start),
        model_names=model_names,
        quiet=True,
    )


class Bowl:
    """A smooth objective with its minimum at ``centre``; counts its calls and raises
    KeyboardInterrupt at call number ``stop_at``."""

    def __init__(self, centre: Sequence[float], stop_at: int | None = None):
        self.centre, self.stop_at, self.calls = tuple(centre), stop_at, 0

    def __call__(self, weights: Sequence[float], timings: dict) -> float:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return sum((w - c) ** 2 for w, c in zip(weights, self.centre, strict=True))


def log_distance(optimum: Sequence[float]) -> Callable[[Sequence[float], dict], float]:
    """Squared log-distance to ``optimum`` (lower is better): scale-free, like weights."""

    def evaluate(weights: Sequence[float], timings: dict) -> float:
        return sum(
            math.log(w / o) ** 2 if w > 0 else 100.0 for w, o in zip(weights, optimum, strict=True)
        )

    return evaluate


def trace(result: SearchResult) -> list[tuple[list[float], float | None]]:
    """Each evaluation's weights and score, in order."""
    return [(e.weights, e.score) for e in result.history]
