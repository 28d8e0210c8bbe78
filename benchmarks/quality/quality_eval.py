"""Scoring: per-character accuracy of the answer under teacher forcing, and exact match.

Each answer character is predicted from the prompt and the *true* preceding answer
characters (one forward pass per task). A whole answer is counted exact when every one
of its characters is the argmax, which is exactly when greedy decoding would produce it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks.quality.quality_models import encode_batch
from benchmarks.quality.quality_tasks import Example


@dataclass(frozen=True)
class Score:
    char_acc: float
    exact: float


# Tokenizing in Python costs more than the tiny model's forward pass, and the study
# scores the same validation lists hundreds of times: encode each list once.
_ENCODED: dict[int, tuple[Sequence[Example], list[tuple[torch.Tensor, ...]]]] = {}


def _encoded(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], batch_size: int
) -> list[tuple[torch.Tensor, ...]]:
    cached = _ENCODED.get(id(examples))
    if cached is not None and cached[0] is examples:
        return cached[1]
    batches = []
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = encode_batch(tokenizer, examples[start : start + batch_size])
        targets = labels[:, 1:].clone()
        # Only the answer characters: drop the eos label that closes each answer.
        targets[targets == tokenizer.eos_token_id] = -100
        # Positions after the last scored one predict nothing that is scored; the
        # forward pass is the study's main cost, so leave them out (rows are right-padded).
        width = int((targets != -100).any(0).nonzero().max()) + 1
        batches.append((ids[:, :width], mask[:, :width], targets[:, :width]))
    _ENCODED[id(examples)] = (examples, batches)
    return batches


@torch.no_grad()
def score_task(
    model, tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], batch_size: int = 1024
) -> Score:
    """Per-character accuracy and exact match over the answer characters (not ``eos``)."""
    right_chars = total_chars = right_rows = 0
    for ids, mask, targets in _encoded(tokenizer, examples, batch_size):
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        scored = targets != -100
        correct = (predicted == targets) & scored
        right_chars += int(correct.sum())
        total_chars += int(scored.sum())
        right_rows += int((correct.sum(-1) == scored.sum(-1)).sum())
    return Score(right_chars / total_chars, right_rows / len(examples))


def score_tasks(
    model, tokenizer: PreTrainedTokenizerFast, data: dict[str, list[Example]], tasks: Sequence[str]
) -> dict[str, Score]:
    model.eval()
    return {task: score_task(model, tokenizer, data[task]) for task in tasks}


def normalized_mean(
    scores: dict[str, Score], reference: dict[str, Score], metric: str = "char_acc"
) -> float:
    """Mean over tasks of score / reference score (the task's expert)."""
    values = [getattr(scores[t], metric) / max(getattr(reference[t], metric), 1e-9) for t in scores]
    return sum(values) / len(values)
