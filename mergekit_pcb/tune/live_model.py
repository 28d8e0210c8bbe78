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


def load_tokenizer(path: str, command: str) -> Any:
    """The tokenizer of the model folder ``path`` (the base's), with which ``command``
    (``the tuner``) scores candidates; a folder without one is a :class:`ConfigError`
    naming it and the files needed (transformers' message names neither)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path}: no tokenizer could be loaded from the base model's folder "
            f"({reason}); {command} scores candidates with the base's tokenizer: copy the "
            "tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
        ) from None
