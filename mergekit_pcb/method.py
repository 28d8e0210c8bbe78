"""mergekit glue: the ``pcb`` merge method, its parameters, and its registration.

mergekit 0.1.5 hands a method one output tensor at a time (a ``TensorGroup``); this
module reads the bound parameters (:func:`prepare_group`), calls
:func:`mergekit_pcb.pcb.pcb_merge`, and returns the result in the input dtype. The
tensor math lives in ``pcb.py``, the glue of ``scope: model`` (whole-model statistics
through mergekit's loaders) in ``method_scope.py``. Nothing here is mutable at module
level: mergekit's multi-GPU executor calls ``merge_group`` from several threads.

Importing this module registers ``pcb`` (its last line). Its top-level imports are
mergekit, pydantic, torch and modules of this package that import no mergekit: the
start-up hook registers ``pcb`` while ``mergekit.merge_methods`` is being imported, which
may happen inside the import of any module of ours that imports mergekit; such a
module is then half initialised, so this one must not need it at import time
(``method_scope`` is imported when ``scope: model`` statistics are first read).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from mergekit import merge_methods

try:
    from mergekit.merge_methods import (
        BasePolicy,
        GroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        TensorGroup,
    )
except ImportError:  # an older mergekit: say which one is needed
    from mergekit_pcb.errors import require_method_registry

    require_method_registry(merge_methods)
    raise

# Not re-exported by mergekit.merge_methods, and needed for a parameter named ``lambda``.
# Imported from mergekit here, not through _mergekit_compat (which pins it): see the
# module docstring on this module's imports.
from mergekit.merge_methods.base import ParameterSpec
from pydantic import AfterValidator

from mergekit_pcb.errors import MergeInputError, non_finite_input, require_method_registry
from mergekit_pcb.names import METHOD_NAME
from mergekit_pcb.pcb import (
    ModelStats,
    NonFiniteInputError,
    PCBOptions,
    check_clamp_ratio,
    check_density,
    pcb_merge,
)

LOG = logging.getLogger(__name__)

#: Fraction of entries kept per model and tensor. 0.2 is the largest value of the
#: released grids (T5: 0.05/0.1/0.2; (IA)3 on T0-3B: 0.2): the top-r threshold is
#: taken per tensor here, and LLM fine-tunes spread their change over more entries.
DEFAULT_DENSITY = 0.2
DEFAULT_CLAMP_RATIO = 0.01


def _finite(name: str):
    def check(value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"pcb parameter '{name}' must be finite, got {value!r}")
        return value

    return AfterValidator(check)


def _parameters() -> tuple[ParameterSpec, ...]:
    return (
        ParameterSpec(
            "weight",
            Annotated[float, _finite("weight")],
            ParameterScope.NON_BASE,
            default=1.0,
            description="per-model weight (the paper's lambda_i), applied after balancing",
        ),
        ParameterSpec(
            "density",
            Annotated[float, AfterValidator(check_density)],
            ParameterScope.NON_BASE,
            default=DEFAULT_DENSITY,
            description="fraction of entries kept per model (r, the mask ratio)",
        ),
        ParameterSpec(
            "lambda",
            Annotated[float, _finite("lambda")],
            ParameterScope.SHARED,
            default=1.0,
            description="global scale of the merged task vector",
        ),
        ParameterSpec(
            "clamp_ratio",
            Annotated[float, AfterValidator(check_clamp_ratio)],
            ParameterScope.SHARED,
            default=DEFAULT_CLAMP_RATIO,
            description="share of |t| clamped at each end before balancing; 0 turns it off",
        ),
        ParameterSpec(
            "scope",
            Literal["tensor", "model"],
            ParameterScope.SHARED,
            default="tensor",
            description="quantiles and min-max per tensor, or over the whole model "
            "(the authors' semantics; costs a streaming statistics pass first)",
        ),
        ParameterSpec(
            "intra_balance",
            bool,
            ParameterScope.SHARED,
            default=True,
            description="exp(n * minmax(|t|)^2) within each model (ablation switch)",
        ),
        ParameterSpec(
            "inter_balance",
            bool,
            ParameterScope.SHARED,
            default=True,
            description="tanh(t_i * sum_j t_j) across models (ablation switch)",
        ),
    )


PCB_SPEC = MergeMethodSpec(
    name=METHOD_NAME,
    pretty_name="PCB-Merging",
    reference_url="https://arxiv.org/abs/2410.02396",
    parameters=_parameters(),
    contract=InputContract(base=BasePolicy.REQUIRED),
)

#: Names a user may write under ``parameters:`` for ``pcb``.
PARAMETER_NAMES = frozenset(p.name for p in PCB_SPEC.parameters)

#: ``(group, densities, options) -> per fine-tune of the group, its whole-model
#: statistics`` (``scope: model``). mergekit's merges read them from the checkpoints
#: (:func:`~mergekit_pcb.method_scope.group_model_stats`); a merge of models held in
#: memory (the evolver's population) supplies its own.
ModelStatsSource = Callable[[TensorGroup, Sequence[float], PCBOptions], list[ModelStats | None]]


def _locate_non_finite(group: TensorGroup) -> ValueError:
    """The error naming the model and tensor holding NaN or Inf (the math found one)."""
    for entry in group.entries:
        if not bool(torch.isfinite(entry.tensor).all()):
            return non_finite_input(entry.id, is_base=entry.is_base, tensor=group.metadata.name)
    return MergeInputError(  # finite inputs whose difference overflows float32
        f"pcb: task vectors of tensor {group.metadata.name or '<unnamed>'} overflow float32"
    )


@dataclass(frozen=True)
class PCBInputs:
    """One tensor group's inputs and settings, ready for ``pcb_merge``."""

    base: torch.Tensor
    finetuned: list[torch.Tensor]
    weights: list[float]
    densities: list[float]
    lam: float
    options: PCBOptions
    stats: list[ModelStats | None] | None  # whole-model statistics (scope: model)


def checkpoint_model_stats(
    group: TensorGroup, densities: Sequence[float], options: PCBOptions
) -> list[ModelStats | None]:
    """``scope: model`` statistics read from the checkpoints through mergekit's loaders
    (:func:`mergekit_pcb.method_scope.group_model_stats`, imported on first use)."""
    from mergekit_pcb.method_scope import group_model_stats

    return group_model_stats(group, densities, options)


def prepare_group(
    group: TensorGroup,
    parameters: dict[str, Any],
    model_stats: ModelStatsSource = checkpoint_model_stats,
) -> PCBInputs:
    """Read the bound parameters of ``group`` (and its whole-model statistics if asked,
    from ``model_stats``).

    Shared by :class:`PCBMerge` and anything else that needs what ``pcb`` would compute
    for a group (the tuner's capture), so that both resolve a config identically.
    """
    entries = group.non_base
    densities = parameters["density"].values_for(entries)
    options = PCBOptions(
        clamp_ratio=parameters["clamp_ratio"],
        intra_balance=parameters["intra_balance"],
        inter_balance=parameters["inter_balance"],
    )
    stats = None
    if parameters["scope"] == "model" and entries:
        stats = model_stats(group, densities, options)
    return PCBInputs(
        base=group.base.tensor,
        finetuned=[entry.tensor for entry in entries],
        weights=parameters["weight"].values_for(entries),
        densities=densities,
        lam=parameters["lambda"],
        options=options,
        stats=stats,
    )


@contextmanager
def naming_non_finite_inputs(group: TensorGroup) -> Iterator[None]:
    """Turn the math's anonymous NaN/Inf error into one that names the model and tensor."""
    try:
        yield
    except NonFiniteInputError:
        raise _locate_non_finite(group) from None


class PCBMerge(GroupMergeMethod):
    """PCB-Merging of one tensor group; requires a base model.

    The registered ``pcb`` reads ``scope: model`` statistics from the checkpoints; a
    copy under another ``spec`` name with another ``model_stats`` serves merges of
    models held in memory (the evolver registers one for the length of a run).
    """

    spec = PCB_SPEC

    def __init__(
        self,
        spec: MergeMethodSpec = PCB_SPEC,
        model_stats: ModelStatsSource = checkpoint_model_stats,
    ):
        self.spec = spec
        self.model_stats = model_stats

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        with naming_non_finite_inputs(group):
            if not group.non_base:
                if not bool(torch.isfinite(group.base.tensor).all()):
                    raise NonFiniteInputError("the base has NaN or Inf values")
                return group.base.tensor
            inputs = prepare_group(group, parameters, self.model_stats)
            return pcb_merge(
                inputs.base,
                inputs.finetuned,
                weights=inputs.weights,
                densities=inputs.densities,
                lam=inputs.lam,
                options=inputs.options,
                stats=inputs.stats,
            )


def register() -> merge_methods.MergeMethod:
    """Register ``pcb`` with mergekit once; return the registered method.

    Idempotent. If another ``pcb`` is already registered (a future mergekit may ship
    its own), that one is kept and a warning says so.
    """
    require_method_registry(merge_methods)
    existing = {m.spec.name: m for m in merge_methods.registered_methods()}.get(METHOD_NAME)
    if existing is None:
        method = PCBMerge()
        merge_methods.register(method)
        return method
    if not isinstance(existing, PCBMerge):
        LOG.warning(
            "mergekit already provides a merge method named %r (%s); mergekit-pcb "
            "leaves it in place, so 'merge_method: pcb' uses mergekit's version",
            METHOD_NAME,
            type(existing).__name__,
        )
    return existing


register()
