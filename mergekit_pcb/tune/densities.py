"""``--densities``: the weight search run once per ``pcb`` density, the best kept.

A ``pcb`` merge is linear in the weights only at a fixed density (the fraction of each
task vector kept), so each density needs its own capture. The tuner runs the whole
weight search at each density in turn, in ``OUT_DIR/density-<d>/`` (its own run
directory: history, resume), with an equal share of the budget, and keeps the best on
validation. One capture lives at a time, so memory stays that of one capture.

Here: the checks and the config of each density; the loop is the job's (``job.py``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.names import METHOD_NAME


def check_densities(values: Sequence[float]) -> list[float]:
    """The densities asked for, each in (0, 1] and distinct, in the order given."""
    out = [float(v) for v in values]
    bad = [v for v in out if not (math.isfinite(v) and 0 < v <= 1)]
    if bad:
        raise ConfigError(f"--densities: each density must be in (0, 1], got {bad[0]:g}")
    if len(set(out)) != len(out):
        raise ConfigError(f"--densities: each density once, got {','.join(f'{v:g}' for v in out)}")
    return out


def check_config_for_densities(raw: dict, model_names: Sequence[str]) -> None:
    """Refuse a config whose merge has no density to set, or whose density varies from
    tensor to tensor (``--densities`` sets one density for every model and tensor)."""
    if raw.get("merge_method") != METHOD_NAME:
        raise ConfigError(
            f"--densities searches pcb's density; merge_method: {raw.get('merge_method')} "
            "has none that the tuner can search"
        )
    settings = [("parameters", (raw.get("parameters") or {}).get("density"))]
    for entry in raw.get("models") or []:
        if isinstance(entry, dict) and str(entry.get("model")) in model_names:
            own = (entry.get("parameters") or {}).get("density")
            settings.append((str(entry["model"]), own))
    for where, setting in settings:
        if setting is not None and (isinstance(setting, (list, dict, bool))):
            raise ConfigError(
                f"{where}: density {setting!r} varies from tensor to tensor, and --densities "
                "sets one density for every model and tensor: write one number, or leave "
                "out --densities"
            )


def config_at_density(raw: dict, density: float) -> dict:
    """The raw config with every model's density set to ``density``."""
    raw = copy.deepcopy(raw)
    for entry in raw.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            entry["parameters"].pop("density", None)
    raw["parameters"] = dict(raw.get("parameters") or {}, density=float(density))
    return raw


def density_dir(out_dir: str, density: float) -> str:
    """Where the search at ``density`` runs."""
    return os.path.join(out_dir, f"density-{density:g}")


def density_summary(density: float, result: Any, test_scores: dict[str, float]) -> dict:
    """One density's line of ``summary.json``."""
    return {
        "density": density,
        "evaluations": len(result.history),
        "start_score": result.start.score,
        "best_score": result.best.score,
        "best_weights": result.best.weights,
        **({"test_scores": test_scores} if test_scores else {}),
    }
