"""mergekit glue: the ``pcb`` merge method, its parameters, and its registration.

mergekit 0.1.5 hands a method one output tensor at a time (a ``TensorGroup``); this
module checks the inputs, calls :func:`mergekit_pcb.core.pcb_merge`, and returns the
result in the input dtype. The tensor math lives in ``core.py``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
from mergekit import merge_methods
from mergekit.merge_methods import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    TensorGroup,
)
from mergekit.merge_methods.base import ParameterSpec
from pydantic import AfterValidator

from mergekit_pcb.core import (
    ModelStats,
    NonFiniteInputError,
    PCBOptions,
    check_clamp_ratio,
    check_density,
    pcb_contributions,
    pcb_merge,
)
from mergekit_pcb.whole_model import whole_model_stats

LOG = logging.getLogger(__name__)

METHOD_NAME = "pcb"

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
            description="per-model coefficient lambda_i, applied after balancing",
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


def _name_non_finite_input(group: TensorGroup) -> ValueError:
    """The error naming the model and tensor holding NaN or Inf (core found one)."""
    for entry in group.entries:
        if not bool(torch.isfinite(entry.tensor).all()):
            role = "base model" if entry.is_base else "model"
            return ValueError(
                f"pcb: {role} {entry.id} has NaN or Inf values in tensor "
                f"{group.metadata.name or '<unnamed>'}"
            )
    return ValueError(  # finite inputs whose difference overflows float32
        f"pcb: task vectors of tensor {group.metadata.name or '<unnamed>'} overflow float32"
    )


#: Receives (tensor name, group, contributions, lambda) while contributions are captured.
ContributionSink = Callable[[str, TensorGroup, torch.Tensor, float], None]
_contribution_sink: ContributionSink | None = None


@contextmanager
def capturing_contributions(sink: ContributionSink) -> Iterator[None]:
    """Within this block, ``pcb`` hands each tensor's per-model contributions to ``sink``.

    Instead of merging, every ``pcb`` tensor group computes
    ``c_i = s_i Tc_i / sum_j s_j`` (float32, shape ``(n, *shape)``, in the order of
    ``group.non_base``), passes it to ``sink`` and returns the base tensor. This is
    how the tuner reuses mergekit's planner (parameter resolution, loading) exactly
    as ``mergekit-yaml`` will run the final config.
    """
    global _contribution_sink
    if _contribution_sink is not None:
        raise RuntimeError("contributions are already being captured")
    _contribution_sink = sink
    try:
        yield
    finally:
        _contribution_sink = None


class PCBMerge(GroupMergeMethod):
    """PCB-Merging of one tensor group; requires a base model."""

    spec = PCB_SPEC

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        try:
            return self._merge_group(group, parameters)
        except NonFiniteInputError:
            raise _name_non_finite_input(group) from None

    def _merge_group(self, group: TensorGroup, parameters: dict[str, Any]) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            if not bool(torch.isfinite(base).all()):
                raise NonFiniteInputError("the base has NaN or Inf values")
            return base
        densities = parameters["density"].values_for(entries)
        options = PCBOptions(
            clamp_ratio=parameters["clamp_ratio"],
            intra_balance=parameters["intra_balance"],
            inter_balance=parameters["inter_balance"],
        )
        finetuned = [entry.tensor for entry in entries]
        stats = None
        if parameters["scope"] == "model":
            stats = _whole_model_stats(group, densities, options)
        if _contribution_sink is not None:
            contributions = pcb_contributions(
                base, finetuned, densities=densities, options=options, stats=stats
            )
            name = group.metadata.name or "<unnamed>"
            _contribution_sink(name, group, contributions, parameters["lambda"])
            return base
        return pcb_merge(
            base,
            finetuned,
            weights=parameters["weight"].values_for(entries),
            densities=densities,
            lam=parameters["lambda"],
            options=options,
            stats=stats,
        )


#: Whole-model statistics computed in this process, most recent last.
_STATS_CACHE: OrderedDict[tuple, tuple[list[ModelStats | None], frozenset[str]]] = OrderedDict()
_STATS_CACHE_SIZE = 16


def _whole_model_stats(
    group: TensorGroup, densities: Sequence[float], options: PCBOptions
) -> list[ModelStats | None]:
    """Statistics over every tensor the checkpoints share, computed once per merge.

    The first ``scope: model`` tensor of a merge streams over all tensors of the
    base and the fine-tunes through mergekit's loaders, on the device and in the
    dtype this group has, so that the statistics match what the merge computes.
    """
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    base = group.base.tensor
    refs = [group.base.id, *(entry.id for entry in group.non_base)]
    if not all(isinstance(ref, ModelReference) for ref in refs):
        raise ValueError(
            "pcb scope: model needs models that mergekit loads (mergekit-yaml, run_merge); "
            "for tensors in memory, use mergekit_pcb.whole_model.whole_model_stats"
        )
    loaders = [LoaderCache().get(ref) for ref in refs]
    files = tuple(
        (path, os.path.getmtime(path))
        for loader in loaders
        for path in sorted(
            {os.path.join(loader.index.base_path, f) for f in loader.index.tensor_paths.values()}
        )
    )
    key = (tuple(refs), tuple(densities), options, base.dtype, str(base.device), files)
    cached = _STATS_CACHE.get(key)
    if cached is None:
        names = [
            name
            for name in loaders[0].index.tensor_paths
            if all(name in loader.index.tensor_paths for loader in loaders[1:])
        ]

        def tensors():
            for name in names:
                loaded = [loader.get_tensor(name, device=str(base.device)) for loader in loaders]
                if all(t.is_floating_point() for t in loaded):
                    loaded = [t.to(dtype=base.dtype) for t in loaded]
                    yield name, loaded[0], loaded[1:]

        LOG.info("pcb scope: model: computing whole-model statistics for %d models", len(refs) - 1)
        try:
            stats = whole_model_stats(tensors, densities, options)
        except NonFiniteInputError as error:
            index = 0 if error.model_index is None else error.model_index + 1
            role = "base model" if index == 0 else "model"
            raise ValueError(
                f"pcb: {role} {refs[index]} has NaN or Inf values in tensor {error.tensor_name}"
            ) from None
        cached = (stats, frozenset(names))
        _STATS_CACHE[key] = cached
        while len(_STATS_CACHE) > _STATS_CACHE_SIZE:
            _STATS_CACHE.popitem(last=False)
    name = group.metadata.name
    if name not in cached[1]:
        raise ValueError(
            f"pcb scope: model: tensor {name} is not stored under that name in every "
            "checkpoint, so it has no whole-model statistics"
        )
    return cached[0]


def register() -> merge_methods.MergeMethod:
    """Register ``pcb`` with mergekit once; return the registered method.

    Idempotent. If another ``pcb`` is already registered (a future mergekit may ship
    its own), that one is kept and a warning says so.
    """
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
