"""The study's models: a small Llama trained on the task mixture, and one expert per task.

The base is trained from scratch on a uniform mixture of all tasks, on half of each
task's keys; each expert is the base fine-tuned on its task, all keys, with a low
learning rate and few steps, half of each batch replaying the base's mixture, so that
the fine-tune is a modest change of the base (a task vector in the usual sense) that
teaches the keys the base never saw and keeps what the base knew. Models are
written with ``save_pretrained`` (float32 safetensors) next to a ``train.json`` holding
the settings that made them; a folder whose settings match is reused, not retrained.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.quality.quality_tasks import Example, Splits, TrainStream
from mergekit_pcb.synthetic import tiny_llama_config, tiny_tokenizer

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 3
    num_attention_heads: int = 6


@dataclass(frozen=True)
class TrainSettings:
    """One training run: the base (all tasks, some keys) or an expert (one task, from the base).

    ``replay`` is the fraction of training examples drawn from ``replay_tasks`` on
    ``replay_keys`` rather than from ``tasks`` on ``keys``.
    """

    tasks: tuple[str, ...]
    keys: tuple[int, ...]
    steps: int
    lr: float
    batch_size: int
    seed: int
    warmup: int = 0
    cosine: bool = False
    weight_decay: float = 0.0
    replay: float = 0.0
    replay_tasks: tuple[str, ...] = ()
    replay_keys: tuple[int, ...] = ()


def llama_config(settings: ModelSettings, vocab_size: int) -> LlamaConfig:
    # Token ids are those of tiny_tokenizer's <s>, </s>, <pad>; 64 positions fit every prompt.
    return tiny_llama_config(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[bos] prompt answer [eos]`` ids, attention mask, and answer labels.

    Labels are ``-100`` except on the answer characters and the closing ``eos``.
    """
    rows = []
    for example in examples:
        prompt = [
            tokenizer.bos_token_id,
            *tokenizer.encode(example.prompt, add_special_tokens=False),
        ]
        answer = [
            *tokenizer.encode(example.answer, add_special_tokens=False),
            tokenizer.eos_token_id,
        ]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        tokens = prompt + answer
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = torch.tensor(answer)
    return ids, mask, labels


def answer_loss(model: LlamaForCausalLM, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _lr_at(step: int, settings: TrainSettings) -> float:
    if settings.warmup and step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    if settings.cosine:
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return settings.lr


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    settings: TrainSettings,
    splits: Splits,
    label: str,
) -> float:
    """Train ``model`` in place; return the mean loss of the last 10% of steps."""
    torch.manual_seed(settings.seed)
    stream = TrainStream(
        settings.tasks,
        settings.keys,
        splits,
        seed=settings.seed,
        replay=settings.replay,
        replay_tasks=settings.replay_tasks,
        replay_keys=settings.replay_keys,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    tail: list[float] = []
    progress = tqdm(range(settings.steps), desc=f"train {label}", leave=False, mininterval=2)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings)
        loss = answer_loss(model, *encode_batch(tokenizer, stream.batch(settings.batch_size)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= settings.steps * 0.9:
            tail.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(tail) / max(1, len(tail))


def _meta(model_settings: ModelSettings, chain: Sequence[TrainSettings], splits: Splits) -> dict:
    # The held-out prompts are part of the key: training avoided exactly these.
    meta = {
        "model": asdict(model_settings),
        "training": [asdict(s) for s in chain],
        "held_out": splits.identity(),
    }
    # As train.json will hold it (tuples become lists), so that a cached copy compares equal.
    return json.loads(json.dumps(meta))


def _is_cached(path: str, meta: dict) -> bool:
    meta_path = os.path.join(path, "train.json")
    if not os.path.exists(os.path.join(path, "model.safetensors")) or not os.path.exists(meta_path):
        return False
    with open(meta_path, encoding="utf-8") as file:
        return json.load(file).get("settings") == meta


def _save(model, tokenizer, path: str, meta: dict, seconds: float, final_loss: float) -> None:
    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "train.json"), "w", encoding="utf-8") as file:
        record = {"settings": meta, "seconds": seconds, "final_loss": final_loss}
        json.dump(record, file, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def build_models(
    out_dir: str,
    model_settings: ModelSettings,
    base_settings: TrainSettings,
    expert_settings: dict[str, TrainSettings],
    splits: Splits,
) -> tuple[dict[str, str], dict[str, float]]:
    """Train (or reuse) the base and the experts; return name -> path and training seconds.

    An expert's cache key includes the base's settings, so a retrained base retrains
    every expert.
    """
    tokenizer = tiny_tokenizer()
    paths = {"base": os.path.join(out_dir, "base")}
    seconds: dict[str, float] = {}
    base_meta = _meta(model_settings, [base_settings], splits)
    if _is_cached(paths["base"], base_meta):
        LOG.info("base: reusing %s", paths["base"])
    else:
        LOG.info(
            "base: training %d steps on %d tasks", base_settings.steps, len(base_settings.tasks)
        )
        torch.manual_seed(base_settings.seed)
        model = LlamaForCausalLM(llama_config(model_settings, len(tokenizer)))
        LOG.info("base: %d parameters", sum(p.numel() for p in model.parameters()))
        began = time.perf_counter()
        loss = train(model, tokenizer, base_settings, splits, "base")
        seconds["base"] = time.perf_counter() - began
        _save(model, tokenizer, paths["base"], base_meta, seconds["base"], loss)
        LOG.info("base: done in %.0f s, final loss %.3f", seconds["base"], loss)
    for name, settings in expert_settings.items():
        paths[name] = os.path.join(out_dir, f"expert_{name}")
        meta = _meta(model_settings, [base_settings, settings], splits)
        if _is_cached(paths[name], meta):
            LOG.info("expert %s: reusing %s", name, paths[name])
            continue
        model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        began = time.perf_counter()
        loss = train(model, tokenizer, settings, splits, name)
        seconds[name] = time.perf_counter() - began
        _save(model, tokenizer, paths[name], meta, seconds[name], loss)
        LOG.info("expert %s: done in %.0f s, final loss %.3f", name, seconds[name], loss)
    return paths, seconds
