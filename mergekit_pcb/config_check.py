"""Checks of a mergekit YAML config that mergekit itself does not make for ``pcb``.

mergekit drops parameter keys that the method does not declare without a word, so
``desnity: 0.1`` would silently merge with the default density. These checks run
wherever the plugin sees the config (the ``mergekit-pcb`` command, the tuner).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from mergekit_pcb.core import check_clamp_ratio, check_density
from mergekit_pcb.method import METHOD_NAME, PARAMETER_NAMES

LOG = logging.getLogger(__name__)

_RANGE_CHECKS = {"density": check_density, "clamp_ratio": check_clamp_ratio}


def _parameter_blocks(node: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every ``parameters:`` mapping in the raw config, with a readable location."""
    if isinstance(node, Mapping):
        label = node.get("model") if isinstance(node.get("model"), str) else None
        here = f"{where} (model {label})" if label else where
        for key, value in node.items():
            if key == "parameters" and isinstance(value, Mapping):
                yield here or "top level", value
            else:
                yield from _parameter_blocks(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _parameter_blocks(item, f"{where}[{index}]")


def _scalar_values(setting: Any) -> Iterator[Any]:
    """Plain values of a mergekit parameter setting (scalar, gradient list, filters)."""
    if isinstance(setting, list):
        for item in setting:
            yield from _scalar_values(item)
    elif isinstance(setting, Mapping):
        if "value" in setting:
            yield from _scalar_values(setting["value"])
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
        yield setting


def check_pcb_config(raw: Mapping[str, Any]) -> list[str]:
    """Validate a raw (YAML-loaded) ``pcb`` config; return warnings, raise on errors.

    Raises ``ValueError`` naming the location for a missing base model or a
    density / clamp ratio out of range. Unknown parameter keys are returned as
    warnings (and logged), with the closest known name when there is one.
    """
    if raw.get("merge_method") != METHOD_NAME:
        return []
    if not raw.get("base_model") and not _has_slice_base(raw):
        raise ValueError(
            "merge_method: pcb needs a base_model (the model the others were fine-tuned from)"
        )
    warnings = []
    for where, block in _parameter_blocks(raw, ""):
        for key, setting in block.items():
            if key not in PARAMETER_NAMES:
                close = difflib.get_close_matches(str(key), sorted(PARAMETER_NAMES), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                warnings.append(
                    f"{where}: unknown pcb parameter '{key}' is ignored by mergekit{hint} "
                    f"(known: {', '.join(sorted(PARAMETER_NAMES))})"
                )
                continue
            check = _RANGE_CHECKS.get(key)
            for value in _scalar_values(setting) if check else ():
                try:
                    check(value)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
    for message in warnings:
        LOG.warning(message)
    return warnings


def _has_slice_base(raw: Mapping[str, Any]) -> bool:
    slices = raw.get("slices") or []
    return bool(slices) and all(isinstance(s, Mapping) and s.get("base_model") for s in slices)
