"""Capture a config's contributions by running mergekit's own plan once.

The tuner does not re-implement config resolution: it registers, for the length of
one capture, a private copy of the config's method under a private name, points a
copy of the config at it, and executes mergekit's plan in memory. mergekit loads,
aligns and binds every tensor group exactly as ``mergekit-yaml`` will for the real
config; the copy's ``merge_group`` hands the group to the method's decomposition
(:data:`LINEAR_METHODS`) instead of merging, and the result goes to a
:class:`~mergekit_pcb.tune.contributions.Contributions`.

Methods whose merge is linear in the per-model weights, and their decomposition
``base + lam * sum_i w_i c_i / D(w)``:

* ``pcb``: ``c_i = s_i Tc_i / max(sum_j s_j, eps)`` (steps 1-5 do not see the weights);
* ``task_arithmetic``: ``c_i = theta_i - theta_base`` in the merge dtype, as mergekit
  takes it; ``D = sum_i w_i`` when ``normalize: true``;
* ``linear``: ``c_i = theta_i``, no base; ``D = sum_i w_i`` when ``normalize: true``
  (its default).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.merge_methods import GroupMergeMethod, MergeMethodSpec, TensorGroup
from mergekit.options import MergeOptions
from tqdm import tqdm

from mergekit_pcb import _mergekit_compat as compat
from mergekit_pcb.console import bars_disabled
from mergekit_pcb.errors import ConfigError
from mergekit_pcb.method import METHOD_NAME, naming_non_finite_inputs, prepare_group
from mergekit_pcb.pcb import undivided_contributions
from mergekit_pcb.tune.compact import CompactRow, compact
from mergekit_pcb.tune.contributions import Contributions, DiskStore, TensorTerms
from mergekit_pcb.tune.placement import Placement, place
from mergekit_pcb.tune.weight_layout import WeightLayout

LOG = logging.getLogger(__name__)

#: ``terms(group, parameters, model_index) -> (TensorTerms, {model index: weight})``
TermsOf = Callable[[TensorGroup, dict[str, Any], Mapping[str, int]], tuple[TensorTerms, dict]]


def _index(model_index: Mapping[str, int], entry_id: object) -> int:
    try:
        return model_index[str(entry_id)]
    except KeyError:
        raise ConfigError(f"model {entry_id} takes part in the merge but is not tuned") from None


def _pcb_terms(group: TensorGroup, parameters: dict, model_index: Mapping[str, int]):
    base = group.base.tensor
    entries = group.non_base
    members = tuple(_index(model_index, e.id) for e in entries)
    if not entries:
        terms = TensorTerms(base.shape, base, parameters["lambda"], (), {})
        return terms, {}
    inputs = prepare_group(group, parameters)

    def keep(_model: int, row: torch.Tensor) -> CompactRow:
        return compact(row)  # copies s_i * Tc_i out of its work buffer

    with naming_non_finite_inputs(group):
        undivided = undivided_contributions(
            inputs.base,
            inputs.finetuned,
            densities=inputs.densities,
            keep=keep,
            options=inputs.options,
            stats=inputs.stats,
        )
    rows = {members[i]: row.divided(undivided.scale_sum) for i, row in undivided.rows.items()}
    terms = TensorTerms(base.shape, base, inputs.lam, members, rows)
    return terms, dict(zip(members, inputs.weights, strict=True))


def _task_arithmetic_terms(group: TensorGroup, parameters: dict, model_index: Mapping[str, int]):
    base = group.base.tensor
    entries = group.non_base
    members = tuple(_index(model_index, e.id) for e in entries)
    # The delta in the merge dtype, as mergekit's task arithmetic takes it.
    rows = {
        index: compact((e.tensor - base).to(torch.float32), base.dtype)
        for index, e in zip(members, entries, strict=True)
    }
    normalize = "guarded" if parameters["normalize"] else "none"
    half = base.dtype if base.dtype in (torch.bfloat16, torch.float16) else None
    terms = TensorTerms(
        base.shape, base, parameters["lambda"], members, rows, normalize, half_precision=half
    )
    return terms, dict(zip(members, parameters["weight"].values_for(entries), strict=True))


def _linear_terms(group: TensorGroup, parameters: dict, model_index: Mapping[str, int]):
    entries = group.entries
    members = tuple(_index(model_index, e.id) for e in entries)
    rows = {
        index: compact(e.tensor.to(torch.float32), e.tensor.dtype)
        for index, e in zip(members, entries, strict=True)
    }
    normalize = "plain" if parameters["normalize"] else "none"
    terms = TensorTerms(entries[0].tensor.shape, None, 1.0, members, rows, normalize)
    return terms, dict(zip(members, parameters["weight"].values_for(entries), strict=True))


LINEAR_METHODS: dict[str, TermsOf] = {
    METHOD_NAME: _pcb_terms,
    "task_arithmetic": _task_arithmetic_terms,
    "linear": _linear_terms,
}


def check_linear_method(config: MergeConfiguration) -> None:
    """Refuse a config whose merge is not linear in the per-model weights."""
    if config.merge_method not in LINEAR_METHODS:
        raise ConfigError(
            f"the tuner needs a merge that is linear in the per-model weights; "
            f"merge_method: {config.merge_method} is not one ("
            f"use one of: {', '.join(LINEAR_METHODS)})"
        )


def tuned_model_names(config: MergeConfiguration) -> list[str]:
    """The models that get a weight: the config's models (but the base, if it has one)."""
    check_linear_method(config)
    if not config.models:
        raise ConfigError(
            "the tuner needs a config with a 'models:' list (slices are not supported)"
        )
    base = str(config.base_model) if config.base_model and config.merge_method != "linear" else None
    names = [str(m.model) for m in config.models if str(m.model) != base]
    if not names:
        raise ConfigError("the config has no model besides the base to tune")
    return names


class _CapturingMethod(GroupMergeMethod):
    """A private copy of a method that records each group's terms instead of merging."""

    def __init__(
        self,
        spec: MergeMethodSpec,
        terms_of: TermsOf,
        model_index: Mapping[str, int],
        keep: Callable[[str, TensorTerms, dict[int, float]], None],
    ):
        self.spec = spec
        self._terms_of = terms_of
        self._model_index = model_index
        self._keep = keep

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        terms, weights = self._terms_of(group, parameters, self._model_index)
        self._keep(group.metadata.name or "<unnamed>", terms, weights)
        return group.entries[0].tensor  # discarded: mergekit only checks its shape


_private_names = itertools.count()


class _Collector:
    """Receives each tensor's terms (from executor threads) and places them."""

    def __init__(
        self,
        placement: Placement,
        devices: Mapping[str, torch.device],
        default_device: torch.device,
        disk: DiskStore | None,
    ):
        self.placement = placement
        self.devices = devices
        self.default_device = default_device
        self.disk = disk
        self.terms: dict[str, TensorTerms] = {}
        self.weights: dict[str, dict[int, float]] = {}  # as mergekit resolved them
        self.lock = threading.Lock()

    def keep(self, name: str, terms: TensorTerms, weights: dict[int, float]) -> None:
        device = torch.device(self.devices.get(name, self.default_device))
        with self.lock:
            # Copied even where they are: the base is mergekit's own tensor.
            self.terms[name] = place(self.placement, name, terms, device, self.disk, copy=True)
            self.weights[name] = {index: float(w) for index, w in weights.items()}


def capture_contributions(
    config: MergeConfiguration,
    options: MergeOptions | None = None,
    *,
    placement: Placement | None = None,
    cache_dir: str | None = None,
    devices: Mapping[str, torch.device] | None = None,
    layout: WeightLayout | None = None,
) -> Contributions:
    """Run mergekit's plan for ``config`` once and keep every tensor's contributions.

    ``layout``: the searched numbers and how each tensor's weights follow from them
    (resolved); it is checked against the weights mergekit resolved for the config. By
    default, one number per model: the config's weight where it is one number.

    ``devices`` maps a tensor name to the device of the live parameter it will update
    (default: the merge's device); ``placement`` decides where the contributions live
    (default: beside the parameter). ``cache_dir`` is where rows go that are placed on
    disk; giving it without a placement puts them all there.
    """
    options = options or MergeOptions(quiet=True)
    names = tuned_model_names(config)
    model_index = {name: i for i, name in enumerate(names)}
    if placement is None:
        placement = Placement(mode="disk" if cache_dir else "device")
    if placement.mode in ("disk", "auto") and cache_dir is None:
        raise ValueError("contributions placed on disk need a cache_dir")
    disk = DiskStore(cache_dir) if cache_dir else None
    collector = _Collector(placement, devices or {}, torch.device(options.device), disk)

    original = merge_methods.get(config.merge_method)
    private = f"_mergekit_pcb_capture_{next(_private_names)}_{config.merge_method}"
    method = _CapturingMethod(
        replace(original.spec, name=private),
        LINEAR_METHODS[config.merge_method],
        model_index,
        collector.keep,
    )
    merge_methods.register(method)
    fixed: dict[str, torch.Tensor] = {}
    try:
        compat.setup_loaders(options)
        planned = compat.plan_tensor_tasks(
            config.model_copy(update={"merge_method": private}), options
        )
        name_of = {task: name for name, task in planned}
        executor = Executor(
            list(name_of),
            math_device=options.device,
            storage_device=options.device,
        )
        for task, value in tqdm(
            executor.run(quiet=True),
            total=len(name_of),
            desc="Capturing contributions",
            unit="tensor",
            disable=bars_disabled(options.quiet),
        ):
            name = name_of[task]
            if name not in collector.terms and value is not None:
                fixed[name] = value
    finally:
        compat.unregister_method(private)
    if disk is not None:
        disk.flush()
    contributions = Contributions(
        names,
        config.merge_method,
        collector.terms,
        fixed,
        layout=_checked_layout(layout, names, collector.weights),
        disk=disk,
        placement=placement,
    )
    LOG.info(
        "contributions: %d bytes, %.3f bytes per parameter per model; with the base, "
        "%d bytes stored: %s",
        contributions.row_bytes,
        contributions.bytes_per_parameter_per_model,
        contributions.stored_bytes,
        placement.describe(),
    )
    return contributions


def _checked_layout(
    layout: WeightLayout | None, names: list[str], resolved: dict[str, dict[int, float]]
) -> WeightLayout:
    """``layout``, checked against mergekit's weights for the config (its start must give
    them, tensor by tensor); by default one number per model, starting from the
    config's weight where it is one number (else 1)."""
    if layout is None:
        seen: dict[int, set[float]] = {}
        for weights in resolved.values():
            for index, weight in weights.items():
                seen.setdefault(index, set()).add(weight)
        start = [
            next(iter(seen[i])) if len(seen.get(i, ())) == 1 else 1.0 for i in range(len(names))
        ]
        return WeightLayout(start, names)
    for tensor, weights in resolved.items():
        expected = layout.tensor_weights(tensor, layout.start)
        for index, weight in weights.items():
            if not math.isclose(expected[index], weight, rel_tol=1e-12, abs_tol=1e-15):
                raise RuntimeError(
                    f"{tensor}: mergekit resolves the weight of {names[index]} to {weight!r}, "
                    f"but the tuner's reading of the config gives {expected[index]!r}"
                )
    return layout


def default_weight(method: str) -> float:
    """The method's default ``weight`` (1 where it has none: mergekit then requires one)."""
    for parameter in merge_methods.get(method).spec.input_parameters:
        if parameter.name == "weight" and not parameter.required:
            return float(parameter.default)
    return 1.0


def plan_weights(raw: dict, options: MergeOptions) -> dict[str, dict[str, float]]:
    """Per tensor, each model's ``weight`` as mergekit's planner resolves it for the raw
    config (planned, not executed: no tensor is read)."""
    config = MergeConfiguration.model_validate(raw)
    out: dict[str, dict[str, float]] = {}
    for name, task in compat.plan_tensor_tasks(config, options):
        parameters = getattr(task, "input_parameters", None) or {}
        out[name] = {
            str(model): float(values["weight"])
            for model, values in parameters.items()
            if "weight" in values
        }
    return out
