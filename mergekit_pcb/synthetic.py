"""Tiny synthetic Llama models, built offline, for the example, the tests and benchmarks.

No model hub is reachable from the machines this project runs on, so the example
makes its own "base" model and "fine-tunes" of it: the base is a randomly
initialised ``LlamaForCausalLM``; each fine-tune adds a task vector made of a
shared direction (so the fine-tunes partly agree) and a model-specific sparse
change (so they also compete), the situation PCB-Merging is designed for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LOG = logging.getLogger(__name__)


def tiny_llama_config(
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    **extra: Any,
) -> LlamaConfig:
    """A small Llama config; ``extra`` sets any other ``LlamaConfig`` field."""
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**fields, **extra})


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built without any download."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def finetune_state(
    base: dict[str, torch.Tensor],
    seed: int,
    *,
    shared_seed: int = 12345,
    scale: float = 0.02,
    sparsity: float = 0.7,
) -> dict[str, torch.Tensor]:
    """A synthetic fine-tune of ``base``: shared drift plus a sparse private change."""
    private = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(shared_seed)
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        ref = tensor.float()
        std = float(ref.std()) if ref.numel() > 1 else 1.0
        std = std if std > 0 else 1.0
        drift = torch.randn(ref.shape, generator=shared) * (0.5 * scale * std)
        change = torch.randn(ref.shape, generator=private) * (scale * std)
        keep = torch.rand(ref.shape, generator=private) >= sparsity
        out[name] = (ref + drift + change * keep).to(tensor.dtype)
    return out


def write_tiny_models(
    out_dir: str,
    names: Sequence[str] = ("math", "code", "chat"),
    *,
    config: LlamaConfig | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``base`` and one fine-tune per name under ``out_dir``; return name -> path.

    Deterministic for a given seed; folders that already hold a model are reused.
    """
    config = config or tiny_llama_config()
    if config.vocab_size < len(SPECIAL_TOKENS) + 96:
        raise ValueError(f"vocab_size {config.vocab_size} is too small for the tiny tokenizer")
    paths = {name: os.path.join(out_dir, name) for name in ("base", *names)}
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = LlamaForCausalLM(config).to(dtype)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for index, name in enumerate(names):
        model.load_state_dict(finetune_state(base_state, seed=seed * 1000 + index + 1))
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        LOG.info("wrote fine-tune %s", paths[name])
    return paths
