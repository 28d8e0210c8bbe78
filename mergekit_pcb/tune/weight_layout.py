"""The numbers the tuner searches: every number of each tuned model's ``weight`` setting.

mergekit lets a model's weight vary from tensor to tensor in two ways, and both are
linear in the numbers the config spells (mergekit 0.1.5, ``config.evaluate_setting``
and ``plan.MergePlanner``):

* **Gradients.** A list of numbers ``[p_1, ..., p_K]`` is read at a position ``t`` in
  [0, 1]: with ``s = t (K - 1)`` and ``i = int(s)``, the value is
  ``(1 - (s - i)) p_i + (s - i) p_min(i+1, K)`` (counting from 0). Layer ``l`` of ``L``
  sits at ``t = l / (L - 1)`` (``t = 1`` when ``L = 1``); the tensors before and after
  the layers (embeddings, the final norm, ``lm_head``) sit at ``t = 0``, so they take
  the first point, as layer 0 does.
* **Filters.** A list of ``{filter: ..., value: ...}`` takes the first entry whose
  filter is missing, ``"*"``, or a substring of the tensor's name; its value (a number
  or a gradient) is read at the same ``t``. When no entry
  matches, the weight comes from the config's ``parameters:``, else the method's
  default: a constant.

So for every tensor, a model's weight is ``(1 - f) x_a + f x_b`` for two of the
numbers ``x`` (``a = b`` for a plain number), or a constant. :class:`WeightLayout`
holds ``a``, ``b`` and ``f`` per tensor and model, and turns the searched numbers
into each tensor's weights, computed as mergekit computes them. It learns them from
mergekit's own planner rather than re-deriving the rule: the config is planned (not
executed) three times with marked numbers, and the weights mergekit resolves name
each tensor's setting and position (:func:`_resolve_positions`).

``--layer-points K`` and ``--module-groups`` write structure into a plain number
before the search (:func:`expand_setting`); :meth:`WeightLayout.config_with` writes
numbers back into the user's structure for ``best.yml``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_pcb.errors import ConfigError

#: A model's weight in one tensor: ``(1 - frac) x[first] + frac x[second]``, or a constant.
Constant = float
#: A leaf of a setting: where it is, its numbers, and the suffix of its numbers' labels.
LeafSpec = tuple[tuple[int | str, ...], list[float], str]


@dataclass(frozen=True)
class Interpolation:
    first: int
    second: int
    frac: float

    def value(self, numbers: Sequence[float]) -> float:
        if self.frac == 0:  # a plain number, or a layer exactly on a point
            return float(numbers[self.first])
        return float((1 - self.frac) * numbers[self.first] + self.frac * numbers[self.second])


@dataclass(frozen=True)
class Leaf:
    """One number or one gradient of a model's weight setting."""

    model: int  # the tuned model's index
    path: tuple[int | str, ...]  # where in the setting (list indices and dict keys)
    offset: int  # index of its first number among all the searched numbers
    size: int  # how many numbers: 1 for a plain number, K for a gradient
    is_gradient: bool


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, str):  # YAML reads 1e-3 as a string; mergekit as a number
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return False


def setting_leaves(setting: Any, where: str) -> list[LeafSpec]:
    """The numbers of one weight setting, leaf by leaf in the config's order:
    ``(path, numbers, label suffix)``. Refuses what is not numbers, gradients and
    filter lists of them (``where`` names the setting in the message)."""
    out: list[LeafSpec] = []

    def refuse(value: Any) -> ConfigError:
        return ConfigError(
            f"{where}: {value!r} is not a number, a list of numbers (a gradient) or a list "
            "of {filter, value} entries whose values are those; the tuner searches the "
            "numbers of a weight setting, so it needs them to be numbers"
        )

    def number_or_gradient(value: Any, path: tuple[int | str, ...], label: str) -> None:
        if _is_number(value):
            out.append((path, [float(value)], label))
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            out.append((path, [float(v) for v in value], label))
        else:
            raise refuse(value)

    def entry(value: dict, path: tuple[int | str, ...]) -> None:
        if "value" not in value:
            raise refuse(value)
        label = f" filter {value.get('filter') or '*'}"
        number_or_gradient(value["value"], (*path, "value"), label)

    if isinstance(setting, dict):  # one {filter, value}, as mergekit allows
        entry(setting, ())
    elif isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for k, value in enumerate(setting):
            entry(value, (k,))
    else:
        number_or_gradient(setting, (), "")
    return out


def expand_setting(setting: Any, layer_points: int | None, module_groups: Sequence[str]) -> Any:
    """A plain-number ``setting`` given structure to search: ``module_groups`` filter
    entries and a rest entry, each value a ``layer_points``-point gradient; anything
    else is returned as it is (the config's own structure is searched as written)."""
    if not _is_number(setting):
        return setting
    value: Any = float(setting)
    if layer_points and layer_points > 1:
        value = [value] * layer_points
    if module_groups:
        return [{"filter": g, "value": copy.deepcopy(value)} for g in module_groups] + [
            {"value": copy.deepcopy(value)}
        ]
    return value


def _replace_at(setting: Any, path: tuple[int | str, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    setting[head] = _replace_at(setting[head], rest, value)
    return setting


class WeightLayout:
    """The searched numbers of every tuned model's weight setting, and how each tensor's
    weights follow from them (see the module docstring).

    ``settings``: one weight setting per tuned model, as YAML holds it.
    ``positions``: per tensor, per tuned model, an :class:`Interpolation` or a constant
    (not needed when every setting is a plain number).
    Built from the settings alone it knows the numbers (:attr:`start`, :attr:`labels`);
    :meth:`resolved` adds where each tensor reads them, when they have structure.
    """

    def __init__(
        self,
        settings: Sequence[Any],
        model_names: Sequence[str],
        positions: Mapping[str, Sequence[Interpolation | Constant]] | None = None,
    ):
        self.model_names = list(model_names)
        self.settings = [copy.deepcopy(s) for s in settings]
        self.leaves: list[Leaf] = []
        self.start: list[float] = []
        self.labels: list[str] = []
        for model, (name, setting) in enumerate(zip(self.model_names, self.settings, strict=True)):
            for path, numbers, suffix in setting_leaves(setting, f"{name}: weight"):
                leaf = Leaf(model, path, len(self.start), len(numbers), len(numbers) > 1)
                self.leaves.append(leaf)
                self.start.extend(numbers)
                for k in range(len(numbers)):
                    point = f" point {k + 1} of {len(numbers)}" if leaf.is_gradient else ""
                    label = f"{name}: weight{suffix}{point}"
                    self.labels.append(name if label == f"{name}: weight" else label)
        self.positions = dict(positions) if positions is not None else None
        # Whether each model has one plain number, which every tensor takes (read per
        # tensor of every candidate, so decided once).
        self.per_model = all(not leaf.is_gradient and not leaf.path for leaf in self.leaves)

    @property
    def size(self) -> int:
        return len(self.start)

    def resolved(self, raw: dict, plan_weights: Any) -> WeightLayout:
        """This layout with each tensor's positions, learnt from mergekit's planner:
        ``plan_weights(raw) -> {tensor: {model name: weight}}`` resolves a raw config's
        weights per tensor (called three times; not at all for plain numbers)."""
        if self.per_model:
            return self
        positions = _resolve_positions(self, raw, plan_weights)
        return WeightLayout(self.settings, self.model_names, positions)

    def tensor_weights(self, name: str, numbers: Sequence[float]) -> list[float]:
        """Tensor ``name``'s weight per tuned model for the searched ``numbers``."""
        if self.per_model:
            return [float(v) for v in numbers]
        if self.positions is None:
            raise RuntimeError("the layout's positions have not been resolved")
        return [
            p.value(numbers) if isinstance(p, Interpolation) else float(p)
            for p in self.positions[name]
        ]

    def settings_with(self, numbers: Sequence[float]) -> list[Any]:
        """Each tuned model's weight setting with ``numbers`` in place of its own."""
        if len(numbers) != self.size:
            raise ValueError(f"expected {self.size} numbers, got {len(numbers)}")
        settings = copy.deepcopy(self.settings)
        for leaf in self.leaves:
            values = [float(v) for v in numbers[leaf.offset : leaf.offset + leaf.size]]
            new = values if leaf.is_gradient else values[0]
            settings[leaf.model] = _replace_at(settings[leaf.model], leaf.path, new)
        return settings

    def config_with(self, raw: dict, numbers: Sequence[float]) -> dict:
        """The raw config with each tuned model's ``weight`` set to its setting with
        ``numbers``; the rest of the config as written."""
        raw = copy.deepcopy(raw)
        by_name = dict(zip(self.model_names, self.settings_with(numbers), strict=True))
        for entry in raw["models"]:
            name = str(entry["model"])
            if name in by_name:
                entry["parameters"] = dict(entry.get("parameters") or {}, weight=by_name[name])
        return raw

    def marked(self, mark: Any) -> list[Any]:
        """Each model's setting with every leaf replaced by ``mark(leaf_number, leaf)``
        (the probes of :func:`_resolve_positions`)."""
        settings = copy.deepcopy(self.settings)
        for number, leaf in enumerate(self.leaves):
            settings[leaf.model] = _replace_at(settings[leaf.model], leaf.path, mark(number, leaf))
        return settings

    def interpolation(self, leaf: Leaf, t: float) -> Interpolation:
        """Where a tensor at position ``t`` reads ``leaf``: mergekit's gradient rule."""
        if not leaf.is_gradient:
            return Interpolation(leaf.offset, leaf.offset, 0.0)
        scaled = t * (leaf.size - 1)
        i0 = int(scaled)
        i1 = min(leaf.size - 1, i0 + 1)
        return Interpolation(leaf.offset + i0, leaf.offset + i1, scaled - i0)


def raw_weight_settings(raw: dict, model_names: Sequence[str], default: float) -> list[Any]:
    """Each tuned model's effective weight setting in the raw config: its own, else the
    config's ``parameters: weight``, else the method's ``default``."""
    shared = (raw.get("parameters") or {}).get("weight", default)
    entries = {str(e["model"]): e for e in raw.get("models") or [] if isinstance(e, dict)}
    out = []
    for name in model_names:
        own = (entries.get(name, {}).get("parameters") or {}).get("weight")
        out.append(copy.deepcopy(shared if own is None else own))
    return out


def search_space(layer_points: int | None, module_groups: Sequence[str]) -> dict[str, Any]:
    """The structure asked of plain-number weights, checked (``layout_for``'s keywords;
    what identifies it in a run's ``run.json``)."""
    if layer_points is not None and layer_points < 1:
        raise ConfigError(f"--layer-points must be at least 1, got {layer_points}")
    groups = [g.strip() for g in module_groups]
    if any(not g for g in groups) or len(set(groups)) != len(groups):
        raise ConfigError(
            f"--module-groups needs distinct non-empty names, got {','.join(module_groups)!r}"
        )
    return {
        "layer_points": layer_points if layer_points and layer_points > 1 else None,
        "module_groups": groups,
    }


def layout_for(
    raw: dict,
    model_names: Sequence[str],
    *,
    default: float = 1.0,
    layer_points: int | None = None,
    module_groups: Sequence[str] = (),
) -> WeightLayout:
    """The (unresolved) layout of the raw config's weight settings, expanded as asked;
    ``default``: the method's default weight."""
    settings = [
        expand_setting(s, layer_points, module_groups)
        for s in raw_weight_settings(raw, model_names, default)
    ]
    return WeightLayout(settings, model_names)


def _resolve_positions(layout: WeightLayout, raw: dict, plan_weights: Any) -> dict:
    """Each tensor's :class:`Interpolation` (or constant) per model, read from three
    plans of the config: every leaf marked with its number ``n + 1``, then ``-(n + 1)``
    (a value that follows neither mark is a constant the settings do not reach), then
    the 2-point gradient ``[0, 1]``, whose value at ``t`` is exactly ``t``."""

    def plan(mark: Any) -> dict[str, dict[str, float]]:
        config = layout.config_with(raw, layout.start)
        by_name = dict(zip(layout.model_names, layout.marked(mark), strict=True))
        for entry in config["models"]:
            if str(entry["model"]) in by_name:
                entry["parameters"]["weight"] = by_name[str(entry["model"])]
        return plan_weights(config)

    def constant(number: float, leaf: Leaf) -> Any:
        return [number] * leaf.size if leaf.is_gradient else number

    plus = plan(lambda n, leaf: constant(n + 1.0, leaf))
    minus = plan(lambda n, leaf: constant(-(n + 1.0), leaf))
    position = plan(lambda n, leaf: [0.0, 1.0])
    positions: dict[str, list[Interpolation | Constant]] = {}
    for tensor, weights in plus.items():
        row: list[Interpolation | Constant] = []
        for name in layout.model_names:
            if name not in weights:  # the model is not in this tensor
                row.append(0.0)
                continue
            a, b = weights[name], minus[tensor][name]
            number = round(a) - 1
            if a == b or not (0 <= number < len(layout.leaves)) or abs(a + b) > 1e-6:
                row.append(float(a))
                continue
            row.append(layout.interpolation(layout.leaves[number], position[tensor][name]))
        positions[tensor] = row
    return positions
