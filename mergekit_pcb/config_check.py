"""Checks of a mergekit YAML config that mergekit itself does not make (in time) for ``pcb``.

mergekit drops parameter keys that the method does not declare without a word, so
``desnity: 0.1`` would silently merge with the default density; it validates the
declared ones only when it plans the merge, with pydantic's multi-line text and no
model named; and it takes any path that is not a folder for a Hugging Face repo id,
so a misspelt local path ends in "Repo id must be in the form ...". These checks run
wherever the plugin sees the config (the ``mergekit-pcb`` command, the tuner),
before any model is loaded.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.method import METHOD_NAME, PARAMETER_NAMES, PCB_SPEC

LOG = logging.getLogger(__name__)

#: The spec's own parameters, so that values are checked by the very rules (pydantic
#: types and validators) that mergekit applies when it plans the merge.
_SPECS = {spec.name: spec for spec in PCB_SPEC.parameters}


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


def _plain_values(setting: Any) -> Iterator[Any]:
    """The plain values of a mergekit parameter setting: a value, the points of a
    gradient list, the ``value`` of each filter entry. (mergekit interpolates a
    gradient between its points; every range checked here is an interval, so
    checking the points checks the interpolated values too.)"""
    if isinstance(setting, list):
        for item in setting:
            yield from _plain_values(item)
    elif isinstance(setting, Mapping):
        if "value" in setting:
            yield from _plain_values(setting["value"])
    else:
        yield setting


def _check_value(key: str, value: Any) -> None:
    """Raise ``ValueError`` (one line) if the spec of ``key`` refuses ``value``."""
    try:
        _SPECS[key].validate(value)
    except ValidationError as error:
        item = error.errors(include_url=False)[0]
        if item["type"] == "value_error" and "error" in item.get("ctx", {}):
            raise ValueError(str(item["ctx"]["error"])) from None  # names the key already
        wanted = str(item["msg"]).removeprefix("Input ").removeprefix("Value ")
        raise ValueError(f"pcb parameter '{key}' {wanted}, got {value!r}") from None


def check_pcb_config(raw: Mapping[str, Any]) -> list[str]:
    """Validate a raw (YAML-loaded) ``pcb`` config; return warnings, raise on errors.

    Raises ``ValueError`` naming the location (the model) and the key for a missing
    base model or a parameter value that ``pcb``'s spec refuses (density or clamp
    ratio out of range, a NaN weight or lambda, an unknown scope). Unknown parameter
    keys and negative weights are returned as warnings (and logged), an unknown key
    with the closest known name when there is one.
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
            values = list(_plain_values(setting))
            for value in values:
                try:
                    _check_value(key, value)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
            negative = [v for v in values if key == "weight" and float(v) < 0]
            if negative:
                # Allowed: subtracting a task vector is a known technique. But a sign
                # slip looks the same, so say it once per model.
                whose = "every model's" if where == "top level" else "this model's"
                warnings.append(
                    f"{where}: weight {negative[0]:g} is negative, so {whose} task vector "
                    "is subtracted, not added"
                )
    for message in warnings:
        LOG.warning(message)
    return warnings


def _has_slice_base(raw: Mapping[str, Any]) -> bool:
    slices = raw.get("slices") or []
    return bool(slices) and all(isinstance(s, Mapping) and s.get("base_model") for s in slices)


def check_model_paths(config: MergeConfiguration) -> None:
    """Raise :class:`ConfigError` for a model path mergekit could not read.

    mergekit (``ModelReference.local_path``) reads a path as a local folder when it
    exists and otherwise downloads it as a Hugging Face repo id. So a path that does
    not exist must be a valid repo id, and one that looks local (its first folder
    exists here) is refused too; a repo id is not looked up (no network needed).
    """
    references = sorted(config.referenced_models(), key=str)
    for reference in references:
        model = reference.model.path
        _check_path(model, f"model {model}", needs_config=True)
        if reference.lora is not None:
            lora = reference.lora.path
            _check_path(lora, f"LoRA {lora} (of model {model})", needs_config=False)


def _check_path(where: str, label: str, *, needs_config: bool) -> None:
    if os.path.isdir(where):
        if needs_config and not os.path.isfile(os.path.join(where, "config.json")):
            raise ConfigError(f"{label}: a folder without config.json, not a model")
        return
    if os.path.exists(where):
        raise ConfigError(f"{label}: a file, not a model folder")
    hint = ""
    if os.path.exists(os.path.expanduser(where)) and where.startswith("~"):
        hint = "; mergekit does not expand '~': write the full path"
    elif not os.path.isabs(where):
        hint = f"; a relative path is read from the current folder, {os.getcwd()}"
    try:
        validate_repo_id(where)
    except HFValidationError:
        raise ConfigError(
            f"{label}: no such folder, and not a Hugging Face repo id{hint}"
        ) from None
    first = where.split("/", 1)[0]
    if "/" in where and os.path.isdir(first):
        raise ConfigError(
            f"{label}: no such folder (it looks local, as {first}/ exists here, "
            f"though mergekit would try it as a Hugging Face repo id){hint}"
        )
