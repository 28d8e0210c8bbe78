"""Validation objectives for the weight search, and which direction is better.

Every objective follows :class:`Objective`: called as ``objective(model, tokenizer)
-> float`` on the live candidate model, it carries a ``name`` and ``maximize`` (True:
higher is better). One that normalises by the fine-tuned models' own scores also
follows :class:`ReferencedObjective`.

* ``completion_loss``: mean cross-entropy on the completions of JSONL files
  (``{"prompt", "completion"}`` rows, or ``{"text"}`` rows scored whole). Lower is
  better. Tasks combine as a plain mean, or ``normalized``: each task's loss divided
  by the best (lowest) loss any single fine-tuned model reaches on it, so that no
  task dominates because its loss is on a larger scale.
* ``exact_match``: share of rows whose greedy completion, whitespace-stripped,
  starts with the stripped ``completion`` (generation runs 2 tokens past its length,
  and a model need not stop by itself). Higher is better; ``normalized`` divides by the best
  fine-tune's accuracy per task.
* ``load_user_objective("pkg.module:function")``: any ``function(model, tokenizer)``;
  the caller states the direction.
* ``LmEvalObjective``: mean accuracy over lm-evaluation-harness tasks (optional
  extra ``lm-eval``). Higher is better. Public benchmarks' test splits are for
  reporting, never for tuning: a task whose name looks like a public benchmark gets
  a warning (lm-eval tasks often score their test split).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from mergekit_pcb.tune.records import best_of

LOG = logging.getLogger(__name__)


@runtime_checkable
class Objective(Protocol):
    """What the search scores a candidate model with."""

    name: str
    maximize: bool

    def __call__(self, model: Any, tokenizer: Any) -> float: ...


@runtime_checkable
class ReferencedObjective(Objective, Protocol):
    """An objective normalised per task by the best score of any single fine-tune."""

    normalized: bool

    def scores(self, model: Any, tokenizer: Any) -> list[float]:
        """One score per task."""
        ...

    def set_reference(self, per_model_scores: Sequence[Sequence[float]]) -> None:
        """Per fine-tuned model, its score on every task (``scores``'s output)."""
        ...


REFERENCE_FILE = "reference_scores.json"


def set_reference_scores(
    objective: ReferencedObjective,
    out_dir: str,
    models: Sequence[str],
    dtype: torch.dtype,
    device: str,
    tokenizer: Any,
) -> None:
    """Give ``objective`` each fine-tuned model's score on every validation task, each
    model loaded alone on ``device``; cached in ``out_dir``'s ``reference_scores.json``,
    so that a resumed run normalises by the same scores."""
    from mergekit_pcb.tune.live_model import load_model
    from mergekit_pcb.tune.run_dir import write_atomic

    path = os.path.join(out_dir, REFERENCE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            scores = json.load(file)
    else:
        scores = []
        for name in models:
            model = load_model(name, dtype, device)
            scores.append(objective.scores(model, tokenizer))
            del model
        write_atomic(path, json.dumps(scores) + "\n")
    objective.set_reference(scores)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_task_file(path: str) -> list[Example]:
    """Rows of a JSONL task file: ``prompt``/``completion``, or ``text`` (no prompt).

    Every error names the file, and the line where there is one.
    """
    rows = "one JSON object per line, with 'prompt' and 'completion', or 'text'"
    examples = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip())  # columns then count within the line
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{number}: not JSON ({error.msg} at column {error.colno}); "
                        f"a task file holds {rows}"
                    ) from None
                if isinstance(row, dict) and "completion" in row:
                    examples.append(Example(str(row.get("prompt", "")), str(row["completion"])))
                elif isinstance(row, dict) and "text" in row:
                    examples.append(Example("", str(row["text"])))
                else:
                    got = (
                        f"keys {', '.join(repr(k) for k in row)}"
                        if isinstance(row, dict) and row
                        else f"{json.dumps(row)[:40]}"
                    )
                    raise ValueError(
                        f"{path}:{number}: a row needs 'prompt'+'completion' or 'text'; got {got}"
                    )
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not examples:
        raise ValueError(f"{path}: no examples (no line that is not blank); expected {rows}")
    if not any(example.completion for example in examples):
        # Otherwise every candidate fails later with "no completion tokens to score",
        # which cannot name the file.
        raise ValueError(f"{path}: every 'completion' (or 'text') is empty: nothing to score")
    return examples


def _encode(tokenizer, example: Example) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and how many of them are the prompt."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = prefix + tokenizer.encode(example.prompt, add_special_tokens=False)
    completion = tokenizer.encode(example.completion, add_special_tokens=False)
    return prompt + completion, len(prompt)


def completion_loss(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> float:
    """Mean token cross-entropy over the completion tokens of ``examples``."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            encoded = [_encode(tokenizer, e) for e in examples[start : start + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            labels = torch.full((len(encoded), width), -100, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, (tokens, n_prompt) in enumerate(encoded):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                labels[row, max(n_prompt, 1) : len(tokens)] = torch.tensor(
                    tokens[max(n_prompt, 1) :]
                )
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(losses)
            count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no completion tokens to score")
    return total / count


def exact_match(model, tokenizer, examples: Sequence[Example]) -> float:
    """Share of examples whose stripped greedy completion starts with the stripped reference."""
    device = next(model.parameters()).device
    hits = 0
    model.eval()
    with torch.no_grad():
        for example in examples:
            prompt_ids, _ = _encode(tokenizer, Example(example.prompt, ""))
            target = tokenizer.encode(example.completion, add_special_tokens=False)
            ids = torch.tensor([prompt_ids], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(target) + 2,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
            hits += text.strip()[: len(example.completion.strip())] == example.completion.strip()
    return hits / len(examples)


@dataclass
class _TaskObjective:
    """Shared shape of the built-in objectives: one score per task file, then combined."""

    files: Sequence[str]
    normalized: bool = False
    per_task: Callable = field(default=completion_loss, repr=False)
    maximize: bool = False
    reference: list[float] | None = None  # per task, from the fine-tuned models

    def __post_init__(self) -> None:
        self.tasks = [read_task_file(path) for path in self.files]
        if not self.tasks:
            raise ValueError("give at least one validation file")

    @property
    def name(self) -> str:
        kind = "accuracy" if self.maximize else "loss"
        return f"{'normalized ' if self.normalized else ''}validation {kind}"

    def scores(self, model, tokenizer) -> list[float]:
        return [self.per_task(model, tokenizer, examples) for examples in self.tasks]

    def set_reference(self, per_model_scores: Sequence[Sequence[float]]) -> None:
        """Per task, the best score any single fine-tuned model reaches."""
        self.reference = [
            best_of(column, self.maximize) for column in zip(*per_model_scores, strict=True)
        ]

    def __call__(self, model, tokenizer) -> float:
        scores = self.scores(model, tokenizer)
        if self.normalized:
            if self.reference is None:
                raise RuntimeError("normalized objective used before set_reference()")
            scores = [s / r if r > 0 else s for s, r in zip(scores, self.reference, strict=True)]
        return sum(scores) / len(scores)


def validation_loss(files: Sequence[str], normalized: bool = False) -> _TaskObjective:
    return _TaskObjective(files, normalized, completion_loss, maximize=False)


def validation_exact_match(files: Sequence[str], normalized: bool = False) -> _TaskObjective:
    return _TaskObjective(files, normalized, exact_match, maximize=True)


@dataclass
class UserObjective:
    """A user's ``function(model, tokenizer) -> float`` with its direction."""

    function: Callable
    maximize: bool
    name: str

    def __call__(self, model, tokenizer) -> float:
        return float(self.function(model, tokenizer))


def load_user_objective(spec: str, maximize: bool) -> UserObjective:
    """``package.module:function`` (or ``path/to/file.py:function``) as an objective."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ValueError(f"objective {spec!r} must look like 'package.module:function'")
    if module_name.endswith(".py") and os.path.exists(module_name):
        spec_obj = importlib.util.spec_from_file_location("_user_objective", module_name)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"objective {spec!r}: {module_name} has no function {attr!r}")
    return UserObjective(function, maximize, spec)


_PUBLIC_BENCHMARK_HINTS = (
    "mmlu",
    "gsm8k",
    "humaneval",
    "arc_",
    "hellaswag",
    "truthfulqa",
    "winogrande",
    "cmmlu",
    "bbh",
    "math",
    "mbpp",
    "piqa",
    "boolq",
)


@dataclass
class LmEvalObjective:
    """Mean of each lm-evaluation-harness task's accuracy (``acc,none`` or ``exact_match``)."""

    tasks: Sequence[str]
    limit: int | None = None
    maximize: bool = True
    name: str = "lm-eval accuracy"

    def __post_init__(self) -> None:
        try:
            import lm_eval  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "lm-evaluation-harness objectives need lm_eval, which is not installed: "
                "pip install 'lm_eval>=0.4'"
            ) from error
        for task in self.tasks:
            if any(hint in task.lower() for hint in _PUBLIC_BENCHMARK_HINTS):
                LOG.warning(
                    "lm-eval task %r looks like a public benchmark; if it scores its test "
                    "split, tuning on it leaks the test set into the merge. Tune on a "
                    "validation split and report the test split once, at the end.",
                    task,
                )

    def __call__(self, model, tokenizer) -> float:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer),
            tasks=list(self.tasks),
            limit=self.limit,
        )["results"]
        values = []
        for task in self.tasks:
            metrics = results[task]
            value = next(
                (
                    metrics[k]
                    for k in ("acc,none", "exact_match,none", "acc_norm,none")
                    if k in metrics
                ),
                None,
            )
            if value is None:
                raise ValueError(f"lm-eval task {task!r} reports no accuracy metric")
            values.append(float(value))
        return sum(values) / len(values)
