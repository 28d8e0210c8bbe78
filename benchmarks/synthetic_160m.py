"""The benchmarks' shared synthetic models: a ~160M-parameter Llama, base + 3 fine-tunes.

Made offline once (bfloat16) and reused by every benchmark script.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from mergekit_pcb.synthetic import tiny_llama_config, write_tiny_models

DEFAULT_DIR = "benchmarks/output/models_160m"
FINETUNES = ("math", "code", "chat")


def config_160m() -> LlamaConfig:
    """The shared ~160M-parameter Llama shape."""
    return tiny_llama_config(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    )


def models_160m(
    directory: str = DEFAULT_DIR, dtype: torch.dtype = torch.bfloat16
) -> dict[str, str]:
    """Name -> folder of ``base`` and the fine-tunes, written on first use."""
    return write_tiny_models(directory, FINETUNES, config=config_160m(), dtype=dtype)
