"""The loop that runs a :class:`~mergekit_pcb.tune.search.WeightSearch` in a run directory.

Per batch: ask the search; replay the candidates the run directory has recorded, and
evaluate the others (each row appended to ``history.jsonl`` as it finishes); tell the
search. Rerunning the same command therefore replays the recorded scores through the
same seeded search, which asks for the same candidates, and carries on; a larger budget
extends a finished run the same way. ``run.json`` holds the run's identity (the caller's
config and objective, and the settings but the budget) and whether the scale search
runs, decided once by the first run of the directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np
from tqdm import tqdm

from mergekit_pcb.console import bars_disabled
from mergekit_pcb.tune.records import (
    BatchEvaluator,
    Candidate,
    Evaluate,
    Evaluation,
    SerialEvaluator,
)
from mergekit_pcb.tune.run_dir import HISTORY_FILE, RunDirectory
from mergekit_pcb.tune.search import (
    SearchResult,
    SearchSettings,
    WeightSearch,
    plan_scale_search,
    planned_evaluations,
    start_weights,
)

LOG = logging.getLogger(__name__)


def run_identity(identity: dict, settings: SearchSettings) -> dict:
    """What identifies a run in ``run.json``: ``identity`` and the settings but the budget.

    The budget is left out so that a larger one extends a run.
    """
    return {**identity, "settings": {**asdict(settings), "budget": None}}


def open_search_run(
    out_dir: str, identity: dict, settings: SearchSettings, n_models: int
) -> RunDirectory[Evaluation]:
    """Create or reopen ``out_dir`` for this search, and refuse what cannot run there.

    Refused: another run in the directory, a budget below the evaluations it holds,
    a budget without room for one generation. Cheap: callers run it before any heavy
    work, so that a wrong directory or budget is refused at once.
    """
    run = RunDirectory.open(out_dir, run_identity(identity, settings), Evaluation.from_row)
    try:
        run.check_budget(settings.budget)
        if "scale_search" not in run.run_json:  # decided once, by the first run here
            run.remember(scale_search=plan_scale_search(settings, n_models))
        planned_evaluations(settings, n_models, bool(run.run_json["scale_search"]))
    except BaseException:
        run.close()
        raise
    return run


def _same_weights(evaluation: Evaluation, candidate: Candidate) -> bool:
    return np.allclose(evaluation.weights, candidate.weights, rtol=0, atol=1e-12)


def run_search(
    evaluate: Evaluate[list[float]] | BatchEvaluator[Candidate, Evaluation],
    n_models: int,
    *,
    maximize: bool,
    out_dir: str,
    identity: dict,
    settings: SearchSettings,
    start: Sequence[float | None] | None = None,
    model_names: Sequence[str] | None = None,
    on_improvement: Callable[[Evaluation], None] | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Search ``n_models`` weights in ``out_dir``; return the start, the best and every
    evaluation.

    ``evaluate`` scores one candidate's weights, or is a :class:`BatchEvaluator`.
    ``start``: the config's weights (see :func:`~mergekit_pcb.tune.search.start_weights`;
    default all 1). ``on_improvement`` is called with each evaluation that improves on
    the best so far.
    """
    names = list(model_names or [f"model {i}" for i in range(n_models)])
    weights = start_weights(settings, start, names)
    with open_search_run(out_dir, identity, settings, n_models) as run:
        resumed = len(run.recorded)
        if resumed:
            LOG.info("resuming: %d evaluations from %s", resumed, HISTORY_FILE)
        run.drop_cut_lines()
        search = WeightSearch(
            settings,
            weights,
            maximize=maximize,
            scale_search=bool(run.run_json["scale_search"]),
            model_names=names,
        )
        evaluator = evaluate if isinstance(evaluate, BatchEvaluator) else SerialEvaluator(evaluate)
        progress = tqdm(
            total=search.planned, desc="search", unit="eval", disable=bars_disabled(quiet)
        )
        try:
            while candidates := search.ask():
                scored, missing = run.replay(candidates, _same_weights)
                progress.update(len(scored))
                if missing:
                    for evaluation in evaluator.evaluate_batch(missing):
                        run.append(evaluation)
                        scored[evaluation.index] = evaluation
                        if not evaluation.ok:
                            LOG.warning(
                                "candidate %d %s failed: %s",
                                evaluation.index,
                                evaluation.weights,
                                evaluation.error.strip().splitlines()[-1],
                            )
                        progress.update(1)
                for evaluation in search.tell(list(scored.values())):
                    if on_improvement is not None:
                        on_improvement(evaluation)
                if search.best is not None:
                    progress.set_postfix(best=f"{search.best.score:.5g}", refresh=False)
            progress.total = len(search.history)
        finally:
            progress.close()
    # The bound notes are the caller's to show (the command prints them once, last).
    return replace(search.result(), resumed=resumed)
