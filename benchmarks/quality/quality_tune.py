"""The study's tuned rows: ``mergekit-pcb-tune``'s default search from a grid's choice.

A tuned row starts from the config its method's grid chose (that row's ``run_merge``
config: its lambda, its density, weight 1 for every model) and runs the tuner library
(:func:`mergekit_pcb.tune.job.tune`) with the default search and only the budget and
seed set, so that every tuned method gets the same search. That default is
scale-aware: it first tries the config's weights times a common scale (1/8 to 8),
then CMA-ES in a box relative to the best scaled start. The common scale matters for
a like-for-like comparison: ``task_arithmetic``'s weights add up (mergekit's
``normalize`` defaults to false for it), so its best weights sit on another scale
than those of ``pcb``, which balances them; a search in fixed absolute bounds would
favour whichever method's scale the bounds happen to fit.

The tuned model the study scores is the tuner's ``best.yml`` merged by ``run_merge``:
what a user of the tuner gets.

The finer searches (:data:`FINER_SEARCHES`) ask whether searching more numbers helps: one
weight per model at a larger budget, a weight per layer and model (``--layer-points`` with
a point per layer of the study's model), and for ``pcb`` the weight search at each density
of its grid (``--densities``), each from the same grid choice.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from mergekit_pcb.tune.job import tune
from mergekit_pcb.tune.objectives import UserObjective
from mergekit_pcb.tune.search import SearchSettings

LOG = logging.getLogger(__name__)

TUNER_SEED = 1
#: The methods given a tuned row: the two the comparison is about, both linear in
#: the per-model weights (what the tuner searches).
TUNED_METHODS = ("task_arithmetic", "pcb")


def tuned_label(method_label: str) -> str:
    return f"{method_label} + tuned weights"


@dataclass(frozen=True)
class FinerSearch:
    """A tuned row searching more than one weight per model at the study's budget."""

    method: str  # the grid row it starts from
    search: str  # "per model", "per layer" or "densities"
    budget: int

    @property
    def label(self) -> str:
        return f"{self.method} + tuned {self.search} ({self.budget})"


FINER_SEARCHES: tuple[FinerSearch, ...] = (
    *(
        FinerSearch(method, search, budget)
        for method in TUNED_METHODS
        for search, budget in (("per model", 200), ("per layer", 60), ("per layer", 200))
    ),
    FinerSearch("pcb", "densities", 200),
)


def tune_weights(
    config_file: str,
    tune_dir: str,
    objective: Callable[[Any, Any], float],
    budget: int,
    identity: dict[str, Any],
    seed: int = TUNER_SEED,
    layer_points: int | None = None,
    densities: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Search the weights of ``config_file`` maximising ``objective``: one per model,
    ``layer_points`` per model (a gradient), or one per model at each of ``densities``.

    Returns what the study records of the search: start and best weights and
    validation scores, the best common scale, the evaluations, the reports of a best
    on the edge of its box, the seconds, the settings, and the path of ``best.yml``.
    """
    # The tuner resumes a run found in its directory; the grid may have chosen another
    # config since the last run, so every run of the study starts over.
    shutil.rmtree(tune_dir, ignore_errors=True)
    settings = SearchSettings(budget=budget, seed=seed)
    began = time.perf_counter()
    result = tune(
        config_file,
        tune_dir,
        UserObjective(objective, True, "validation normalised per-character accuracy"),
        settings,
        identity_objective=identity,
        quiet=True,
        layer_points=layer_points,
        densities=densities,
    )
    seconds = time.perf_counter() - began
    history = result.history
    # The best of the scale phase (the start is its scale 1): the candidate CMA-ES's
    # box is built around, as a multiple of the start weights.
    scaled = [e for e in history if e.phase in ("start", "scale") and e.ok]
    best_scaled = max(scaled, key=lambda e: e.score)
    start = result.start.weights
    return {
        "start_weights": start,
        "weights": result.best.weights,
        "best_scale": best_scaled.weights[0] / start[0],
        "val_objective_start": result.start.score,
        "val_objective_best_scale": best_scaled.score,
        "val_objective_best": result.best.score,
        "best_phase": result.best.phase,
        "evaluations": len(history),
        "failed": sum(not e.ok for e in history),
        "on_bound": [asdict(hit) for hit in result.search.on_bound],
        "on_bound_messages": [hit.message() for hit in result.search.on_bound],
        "seconds": seconds,
        "search": asdict(settings),
        "best_yml": os.path.join(tune_dir, "best.yml"),
        "layer_points": layer_points,
        "densities": result.densities,
    }


def read_yaml_config(path: str) -> dict[str, Any]:
    """A mergekit YAML config (``best.yml``: its header comment is YAML's comment)."""
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file)
