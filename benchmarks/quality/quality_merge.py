"""The merges of the quality study: methods, their hyper-parameter grids, two merge paths.

Every method is mergekit's own (``pcb`` is this package's registered method). The
validation grid search merges in memory with mergekit's ``merge_state_dicts`` (the
same merge-method objects ``mergekit-yaml`` runs, without writing files), because it
runs hundreds of merges; each chosen setting is then written as an ordinary mergekit
YAML config and merged by ``run_merge`` (the ``mergekit-yaml`` path) into the model
that is scored on the test split.

``dare_ties`` and ``della`` drop at random; mergekit takes no seed for them, so the
torch RNG is seeded before every merge (``RANDOM_SEED``; mergekit's own
``random_seed`` option on the ``run_merge`` path), which makes each of their merges
reproducible but not identical between the two paths (tensors are visited in another
order).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import get as get_merge_method
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.options import MergeOptions

import mergekit_pcb

LOG = logging.getLogger(__name__)
RANDOM_SEED = 1234

# Methods that sum task vectors (no normalisation by the sum of weights) want a
# lambda near 1/n to 1; those that average (ties, della, pcb) want lambda near 1 (the
# PCB paper's grid runs 0.8 to 2.2). Both grids span the values chosen in earlier runs
# of this study with room on each side.
SUM_LAMBDAS = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
MEAN_LAMBDAS = (0.4, 0.6, 0.8, 1.0, 1.3, 1.6)
DENSITIES = (0.1, 0.3, 0.6, 0.9)


@dataclass(frozen=True)
class MethodSpec:
    """A study row: a mergekit method, its fixed parameters, and the grid searched."""

    label: str
    method: str
    lambdas: tuple[float, ...]
    densities: tuple[float, ...] = (1.0,)
    fixed_model: dict[str, Any] = field(default_factory=dict)  # per-model, not searched
    fixed_global: dict[str, Any] = field(default_factory=dict)
    random: bool = False


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("task_arithmetic", "task_arithmetic", SUM_LAMBDAS),
    MethodSpec("ties", "ties", MEAN_LAMBDAS, DENSITIES),
    MethodSpec("dare_ties", "dare_ties", SUM_LAMBDAS, DENSITIES, random=True),
    # della's drop probabilities span density +- epsilon; 0.05 keeps that inside (0, 1]
    # for every density of the grid.
    MethodSpec(
        "della", "della", MEAN_LAMBDAS, DENSITIES, fixed_model={"epsilon": 0.05}, random=True
    ),
    MethodSpec(
        "breadcrumbs_ties", "breadcrumbs_ties", SUM_LAMBDAS, DENSITIES, fixed_model={"gamma": 0.01}
    ),
    MethodSpec("pcb", "pcb", MEAN_LAMBDAS, DENSITIES),
)

# The paper's ablations (its Table 7): each switch off alone, grid searched like pcb.
ABLATIONS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "pcb w/o intra-balancing",
        "pcb",
        MEAN_LAMBDAS,
        DENSITIES,
        fixed_global={"intra_balance": False},
    ),
    MethodSpec(
        "pcb w/o inter-balancing",
        "pcb",
        MEAN_LAMBDAS,
        DENSITIES,
        fixed_global={"inter_balance": False},
    ),
    MethodSpec("pcb w/o drop", "pcb", MEAN_LAMBDAS, (1.0,)),
)


def _model_parameters(spec: MethodSpec, density: float, weight: float) -> dict[str, Any]:
    params: dict[str, Any] = {"weight": weight}
    if spec.method != "task_arithmetic":
        params["density"] = density
    params.update(spec.fixed_model)
    return params


def merge_in_memory(
    spec: MethodSpec,
    setting: dict[str, float],
    base: dict[str, torch.Tensor],
    experts: dict[str, dict[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge with mergekit's in-memory API; float32 state dicts in and out."""
    mergekit_pcb.register()
    names = list(experts)
    weights = list(weights) if weights is not None else [1.0] * len(names)
    per_model = {
        name: _model_parameters(spec, setting["density"], weight)
        for name, weight in zip(names, weights, strict=True)
    }
    parameters: dict[str, Any] = {"lambda": setting["lambda"], **spec.fixed_global}
    for key in per_model[names[0]]:
        parameters[key] = {name: per_model[name][key] for name in names}
    if spec.random:
        torch.manual_seed(RANDOM_SEED)
    with torch.no_grad():
        return merge_state_dicts(
            {"base": base, **experts},
            get_merge_method(spec.method),
            parameters=parameters,
            base="base",
            dtype=torch.float32,
        )


def scale_merge(
    base: dict[str, torch.Tensor], unit: dict[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """The merge at ``lam`` from the same merge at lambda 1: ``base + lam * (unit - base)``.

    Every method of the study (mergekit's task-arithmetic family and ``pcb``) returns
    ``base + lambda * delta`` with ``delta`` independent of lambda, so a grid merges once
    per density and scales, instead of once per setting. The study checks the scaled
    merge of each chosen setting against a direct merge.
    """
    return {name: base[name] + lam * (unit[name] - base[name]) for name in unit}


def mergekit_config(
    spec: MethodSpec,
    setting: dict[str, float],
    base_path: str,
    expert_paths: dict[str, str],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The same merge as an ordinary mergekit YAML config (as a dict)."""
    weights = list(weights) if weights is not None else [1.0] * len(expert_paths)
    return {
        "merge_method": spec.method,
        "base_model": base_path,
        "models": [
            {"model": path, "parameters": _model_parameters(spec, setting["density"], weight)}
            for path, weight in zip(expert_paths.values(), weights, strict=True)
        ],
        "parameters": {"lambda": setting["lambda"], **spec.fixed_global},
        "dtype": "float32",
    }


def merge_with_mergekit(config: dict[str, Any], out_dir: str, random: bool) -> None:
    """Write ``config`` beside ``out_dir`` and merge it the ``mergekit-yaml`` way."""
    mergekit_pcb.register()
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    with open(out_dir.rstrip("/") + ".yml", "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False)
    run_merge(
        MergeConfiguration.model_validate(config),
        out_dir,
        options=MergeOptions(
            quiet=True, random_seed=RANDOM_SEED if random else None, write_model_card=False
        ),
    )
