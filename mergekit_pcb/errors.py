"""The errors this package raises for bad input, worded once.

Library code raises these (``ValueError`` subclasses); the commands turn them into
one ``Error:`` line. Importing this module costs no more than the standard library (the
commands report config errors before they import torch or mergekit).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class ConfigError(ValueError):
    """A config (or an option standing for one) that cannot be merged or tuned as given."""


class MergeInputError(ValueError):
    """A checkpoint whose tensors cannot be merged (NaN or Inf, missing tensors)."""


def non_finite_input(model: Hashable, *, is_base: bool, tensor: str | None) -> MergeInputError:
    """The error naming the model and the tensor that hold NaN or Inf."""
    role = "base model" if is_base else "model"
    return MergeInputError(
        f"pcb: {role} {model} has NaN or Inf values in tensor {tensor or '<unnamed>'}"
    )


def field_path(location: Sequence[Any]) -> str:
    """A pydantic error location as a config writer reads it: ``models[1].model``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "top level"


def validator_message(item: Mapping[str, Any]) -> str | None:
    """The text of the ``ValueError`` a validator raised, for one item of pydantic's
    ``ValidationError.errors()``; ``None`` when pydantic itself refused the value.

    A validator's own message already says what it wants and names the setting, so it
    is shown as it is rather than behind pydantic's "Value error, " prefix."""
    if item["type"] == "value_error" and "error" in item.get("ctx", {}):
        return str(item["ctx"]["error"])
    return None


def describe_validation_error(error: ValidationError) -> str:
    """A pydantic ``ValidationError`` in one line: ``field: problem (got value)``, joined
    by ``; ``. pydantic's own text spans three lines per problem and names the model
    class (``MergeConfiguration``), which a config's author never wrote."""
    problems = []
    for item in error.errors(include_url=False):
        message = validator_message(item)
        if message is None and item["type"] == "missing":
            message = "required, but missing"
        elif message is None:
            message = f"{item['msg']} (got {item.get('input')!r})"
        problems.append(f"{field_path(item['loc'])}: {message}")
    return "; ".join(problems)


def require_method_registry(merge_methods: Any) -> None:
    """Raise ImportError naming the mergekit needed when ``mergekit.merge_methods`` has
    no public registry (``register``, ``registered_methods``): mergekit 0.1.4 and the
    older sources on GitHub, where ``pcb`` cannot be registered."""
    if hasattr(merge_methods, "register") and hasattr(merge_methods, "registered_methods"):
        return
    from importlib import metadata

    try:
        installed = f"mergekit {metadata.version('mergekit')}"
    except metadata.PackageNotFoundError:
        installed = "this mergekit"
    raise ImportError(
        f"mergekit-pcb needs mergekit 0.1.5 or later, whose mergekit.merge_methods has the "
        f"public register(); {installed} does not: pip install 'mergekit>=0.1.5'"
    )
