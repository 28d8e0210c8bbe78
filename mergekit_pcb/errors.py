"""The errors this package raises for bad input, worded once.

Library code raises these (``ValueError`` subclasses); the commands turn them into
one ``Error:`` line.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

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


def describe_validation_error(error: ValidationError) -> str:
    """A pydantic ``ValidationError`` in one line: ``field: problem (got value)``, joined
    by ``; ``. pydantic's own text spans three lines per problem and names the model
    class (``MergeConfiguration``), which a config's author never wrote."""
    problems = []
    for item in error.errors(include_url=False):
        message = str(item["msg"])
        if item["type"] == "value_error" and "error" in item.get("ctx", {}):
            # A validator's own ValueError already says what it wants.
            message = str(item["ctx"]["error"])
        elif item["type"] == "missing":
            message = "required, but missing"
        else:
            message = f"{message} (got {item.get('input')!r})"
        problems.append(f"{field_path(item['loc'])}: {message}")
    return "; ".join(problems)
