"""The errors this package raises for bad input, worded once.

Library code raises these (``ValueError`` subclasses); the commands turn them into
one ``Error:`` line.
"""

from __future__ import annotations

from collections.abc import Hashable


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
