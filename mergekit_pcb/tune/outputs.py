"""What a search writes besides its history: the best config and the plot of its scores.

Shared by the searches over merges (``mergekit-pcb-tune``, ``mergekit-pcb-evolve``):
:func:`config_yaml` writes the user's config with some of its ``models:`` entries
changed (the tuner: their ``weight``; the evolver: their path), so that
``mergekit-yaml`` runs the result; :func:`plot_scores` draws score against evaluation
with the best so far. matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from mergekit_pcb.tune.records import is_better

#: ``edit(entry)``: a ``models:`` entry of the config (a copy, free to change in place).
EditEntry = Callable[[dict[str, Any]], None]


def config_yaml(raw: dict, edits: dict[str, EditEntry], header: str) -> str:
    """``raw`` (the config's YAML mapping) with ``edits[name]`` applied to the ``models:``
    entry of model ``name``, as YAML text after the comment lines of ``header``."""
    raw = copy.deepcopy(raw)
    for entry in raw.get("models") or []:
        edit = edits.get(str(entry["model"]))
        if edit is not None:
            edit(entry)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(raw, sort_keys=False)


def plot_scores(
    points: Sequence[tuple[int, float | None]],
    *,
    maximize: bool,
    title: str,
    path: str,
    start_label: str = "start",
) -> None:
    """Score against evaluation (``(index, score)``, None for a failed one), with the
    best so far and the first point's score as the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(i, s) for i, s in points if s is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([i for i, _ in ok], [s for _, s in ok], s=12, label="candidate")
    best, line = None, []
    for _, score in points:
        if score is not None and is_better(score, best, maximize):
            best = score
        line.append(best)
    ax.step(range(len(points)), line, where="post", color="C1", label="best so far")
    if points and points[0][1] is not None:
        ax.axhline(points[0][1], color="grey", ls="--", label=start_label)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(title)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("score (" + ("higher" if maximize else "lower") + " is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
