"""The live model: a transformers causal LM loaded once, into which candidates are written.

transformers is imported when a model is loaded, not with this module.
"""

from __future__ import annotations

from typing import Any

import torch

from mergekit_pcb.errors import ConfigError


def resolve_device(device: str) -> str:
    """``auto``: the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str, dtype: torch.dtype, device: str, device_map: str | None = None) -> Any:
    """A transformers causal LM on ``device`` (or spread by accelerate's ``device_map``),
    in eval mode."""
    from transformers import AutoModelForCausalLM

    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as error:
            raise ConfigError("--device-map needs accelerate: pip install accelerate") from error
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()
