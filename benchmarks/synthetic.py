"""The benchmarks' shared synthetic models: a random Llama base and 3 fine-tunes.

Two sizes: ``160m`` (the CPU benchmarks) and ``500m`` (the CUDA benchmarks, the size
of the earlier GPU measurements). Made offline once (bfloat16 unless asked otherwise) and
reused by every benchmark script.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from mergekit_pcb.synthetic import tiny_llama_config, write_tiny_models

SIZES = ("160m", "500m")
DEFAULT_DIRS = {size: f"benchmarks/output/models_{size}" for size in SIZES}
FINETUNES = ("math", "code", "chat")


def llama_config(size: str) -> LlamaConfig:
    """The Llama shape of ``size``: ~160M or ~0.5B parameters, untied embeddings."""
    if size == "160m":
        return tiny_llama_config(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
        )
    if size == "500m":
        return tiny_llama_config(
            vocab_size=32000,
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=14,
            num_attention_heads=12,
        )
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")


def synthetic_models(
    size: str = "160m", directory: str | None = None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, str]:
    """Name -> folder of ``base`` and the fine-tunes of ``size``, written on first use."""
    return write_tiny_models(
        directory or DEFAULT_DIRS[size], FINETUNES, config=llama_config(size), dtype=dtype
    )
