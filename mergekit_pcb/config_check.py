"""Checks of a mergekit YAML config that mergekit itself does not make (in time) for ``pcb``.

mergekit drops parameter keys that the method does not declare without a word, so
``desnity: 0.1`` would silently merge with the default density; it validates the
declared ones only when it plans the merge, with pydantic's multi-line text and no
model named; and it takes any path that is not a folder for a Hugging Face repo id,
so a misspelt local path ends in "Repo id must be in the form ...". These checks run
wherever the plugin sees the config (the ``mergekit-pcb`` command, the tuner),
before any model is loaded.

:func:`read_raw_config` makes the checks that need neither torch nor mergekit (YAML
syntax, a missing base model, unknown ``pcb`` keys, model paths that do not exist), so
that the command answers them in a fraction of a second: this module imports neither
at module level. The value checks (:func:`check_pcb_values`) use the method's own spec
and import it when called.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_pcb.errors import ConfigError, validator_message
from mergekit_pcb.names import METHOD_NAME, PARAMETER_NAMES

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods.base import ParameterSpec

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawConfig:
    """A config file as read, before mergekit parses it: its text and the YAML mapping."""

    path: str
    source: str
    raw: dict[str, Any]


def read_raw_config(config_file: str, *, strict: bool = False) -> RawConfig:
    """Read a mergekit YAML config and make the checks that need no mergekit.

    Raises :class:`ConfigError` starting with the file's name for a file that cannot be
    read, a YAML syntax error (with its line and column), a config that is not a
    mapping, a ``pcb`` config without a base model, and a model path that does not
    exist (:func:`check_raw_model_paths`). Unknown ``pcb`` parameter keys are logged as
    warnings. The values and mergekit's schema are checked later, when the config is
    parsed (``mergekit_pcb.merge.read_config``). With ``strict`` an unknown key is a
    :class:`ConfigError` instead (a search refuses to run a merge that is not the one meant).
    """
    try:
        with open(config_file, encoding="utf-8") as file:
            source = file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = (error.strerror or str(error)) if isinstance(error, OSError) else "not UTF-8"
        raise ConfigError(f"{config_file}: cannot read the config ({reason})") from None
    try:
        raw = yaml.safe_load(source)
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_file}: {_describe_yaml_error(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: not a mergekit YAML config (a mapping)")
    try:
        unknown = check_pcb_keys(raw)
        if strict and unknown:
            raise ValueError(unknown[0])
        log_warnings(unknown)
        check_raw_model_paths(raw)
    except ValueError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    return RawConfig(config_file, source, raw)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the line and column in the file.

    PyYAML parses a string here, so its own text says ``in "<unicode string>"``."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"not valid YAML ({error})"
    mark = error.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {error.problem}"
    if error.context and error.context_mark is not None:
        begun = error.context_mark
        text += f" ({error.context} at line {begun.line + 1}, column {begun.column + 1})"
    return text


def log_warnings(warnings: Iterable[str]) -> None:
    """Log each of the checks' warnings once."""
    for message in warnings:
        LOG.warning(message)


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


@functools.cache
def _parameter_specs() -> dict[str, ParameterSpec]:
    """The spec's own parameters, so that values are checked by the very rules (pydantic
    types and validators) that mergekit applies when it plans the merge."""
    from mergekit_pcb.method import PCB_SPEC  # torch and mergekit: only for value checks

    return {spec.name: spec for spec in PCB_SPEC.parameters}


def _check_value(key: str, value: Any) -> None:
    """Raise ``ValueError`` (one line) if the spec of ``key`` refuses ``value``."""
    from pydantic import ValidationError

    try:
        _parameter_specs()[key].validate(value)
    except ValidationError as error:
        item = error.errors(include_url=False)[0]
        message = validator_message(item)
        if message is not None:
            raise ValueError(message) from None  # names the key already
        wanted = str(item["msg"]).removeprefix("Input ").removeprefix("Value ")
        raise ValueError(f"pcb parameter '{key}' {wanted}, got {value!r}") from None


def check_pcb_config(raw: Mapping[str, Any]) -> list[str]:
    """Validate a raw (YAML-loaded) ``pcb`` config; return warnings, raise on errors.

    :func:`check_pcb_keys` and :func:`check_pcb_values` together, their warnings
    logged: raises ``ValueError`` naming the location (the model) and the key for a
    missing base model or a parameter value that ``pcb``'s spec refuses (density or
    clamp ratio out of range, a NaN weight or lambda, an unknown scope). Unknown
    parameter keys and negative weights are returned as warnings (and logged), an
    unknown key with the closest known name when there is one.
    """
    warnings = check_pcb_keys(raw) + check_pcb_values(raw)
    log_warnings(warnings)
    return warnings


def check_pcb_keys(raw: Mapping[str, Any]) -> list[str]:
    """The checks of a raw ``pcb`` config that need no mergekit: raise ``ValueError`` for
    a missing base model; return a warning (not logged) per unknown parameter key."""
    if raw.get("merge_method") != METHOD_NAME:
        return []
    if not raw.get("base_model") and not _has_slice_base(raw):
        raise ValueError(
            "merge_method: pcb needs a base_model (the model the others were fine-tuned from)"
        )
    warnings = []
    for where, block in _parameter_blocks(raw, ""):
        for key in block:
            if key not in PARAMETER_NAMES:
                close = difflib.get_close_matches(str(key), sorted(PARAMETER_NAMES), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                warnings.append(
                    f"{where}: unknown pcb parameter '{key}' is ignored by mergekit{hint} "
                    f"(known: {', '.join(sorted(PARAMETER_NAMES))})"
                )
    return warnings


def check_parameter_keys(raw: Mapping[str, Any], method: str, known: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the location of the first parameter key that is not
    one of ``known`` (merge method ``method``'s parameters), which mergekit would ignore."""
    known = sorted(known)
    for where, block in _parameter_blocks(raw, ""):
        for key in block:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"{where}: unknown {method} parameter '{key}', which mergekit would "
                    f"ignore{hint} (known: {', '.join(known)})"
                )


def check_pcb_values(raw: Mapping[str, Any]) -> list[str]:
    """Check every ``pcb`` parameter value of a raw config against the method's spec.

    Raises ``ValueError`` naming the location (the model) and the key of the first value
    the spec refuses; returns a warning (not logged) per block with a negative weight.
    Imports the method (torch, mergekit) when the config is a ``pcb`` one.
    """
    if raw.get("merge_method") != METHOD_NAME:
        return []
    warnings = []
    for where, block in _parameter_blocks(raw, ""):
        for key, setting in block.items():
            if key not in PARAMETER_NAMES:
                continue  # check_pcb_keys warns about it
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
    return warnings


def _has_slice_base(raw: Mapping[str, Any]) -> bool:
    slices = raw.get("slices") or []
    return bool(slices) and all(isinstance(s, Mapping) and s.get("base_model") for s in slices)


def check_model_paths(config: MergeConfiguration) -> None:
    """Raise :class:`ConfigError` for a model path of a parsed config that mergekit could
    not read (every model :meth:`MergeConfiguration.referenced_models` names).

    mergekit (``ModelReference.local_path``) reads a path as a local folder when it
    exists and otherwise downloads it as a Hugging Face repo id. So a path that does
    not exist must be a valid repo id, and one that looks local (its first folder
    exists here) is refused too; a repo id is not looked up (no network needed).
    """
    _check_references(
        (reference.model.path, reference.lora.path if reference.lora is not None else None)
        for reference in config.referenced_models()
    )


def check_raw_model_paths(raw: Mapping[str, Any]) -> None:
    """:func:`check_model_paths` on the raw config, before mergekit parses it.

    Reads the model references where mergekit's ``referenced_models`` finds them (the
    base model, each model, each slice's sources, the same inside modules), in the forms
    mergekit parses: ``path``, ``path@revision``, ``model+lora``, or a mapping with
    ``model`` and ``lora``. A reference in another form is left to mergekit's schema.
    """
    references = (_raw_reference_paths(value) for value in _raw_references(raw))
    _check_references(paths for paths in references if paths is not None)


def _raw_references(raw: Mapping[str, Any]) -> Iterator[Any]:
    def of_models(models: Any) -> Iterator[Any]:
        for model in models if isinstance(models, list) else []:
            if isinstance(model, Mapping):
                yield model.get("model")

    def of_slices(slices: Any) -> Iterator[Any]:
        for slice_ in slices if isinstance(slices, list) else []:
            if isinstance(slice_, Mapping):
                yield from of_models(slice_.get("sources"))

    yield raw.get("base_model")
    yield from of_models(raw.get("models"))
    yield from of_slices(raw.get("slices"))
    modules = raw.get("modules")
    for module in modules.values() if isinstance(modules, Mapping) else []:
        if isinstance(module, Mapping):
            yield from of_models(module.get("models"))
            yield from of_slices(module.get("slices"))


def _raw_reference_paths(value: Any) -> tuple[str, str | None] | None:
    """(model path, LoRA path or None) of a raw reference, as mergekit's ``ModelReference``
    and ``ModelPath`` parse it (``model+lora``, ``path@revision``); None if malformed."""
    if isinstance(value, str):
        parts: list[Any] = value.split("+")
        if len(parts) > 2:
            return None
    elif isinstance(value, Mapping):
        parts = [value.get("model")] + ([value["lora"]] if value.get("lora") else [])
    else:
        return None
    paths = [_raw_path(part) for part in parts]
    if any(path is None for path in paths):
        return None
    return paths[0], (paths[1] if len(paths) == 2 else None)


def _raw_path(value: Any) -> str | None:
    if isinstance(value, str):
        path, *revision = value.split("@")
        return path if len(revision) <= 1 else None
    if isinstance(value, Mapping) and isinstance(value.get("path"), str):
        return value["path"]
    return None


def _check_references(references: Iterable[tuple[str, str | None]]) -> None:
    """Check each (model path, LoRA path) in a fixed order, so that the first bad one
    reported does not depend on how the config was read."""
    for model, lora in sorted(set(references), key=lambda pair: (pair[0], pair[1] or "")):
        _check_path(model, f"model {model}", needs_config=True)
        if lora is not None:
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
    # Imported here: huggingface_hub.utils costs a tenth of a second, needed only now.
    from huggingface_hub.utils import HFValidationError, validate_repo_id

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
