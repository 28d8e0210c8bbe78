"""The generated tasks of the quality study, and their disjoint train / val / test splits.

Every task maps a short prompt (a task tag, a space, the input, ``=``) to a short answer
of a fixed length (1 or 3 characters), so that per-character accuracy under teacher
forcing is a smooth score, and a whole answer is right exactly when greedy decoding would
produce it. Splits are drawn with fixed seeds: the test set first, then the validation
set avoiding it; training examples are drawn on the fly and never equal a validation or
test prompt.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A named generator of (input, answer) pairs; ``tag`` starts every prompt."""

    name: str
    tag: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]

    def sample(self, rng: random.Random) -> Example:
        given, answer = self.make(rng)
        return Example(f"{self.tag} {given}=", answer)


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a:02d}*{b:02d}", str((a * b) % 10)


def _shift_by(s: str, k: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def _shift(rng: random.Random) -> tuple[str, str]:
    k = rng.randrange(1, 6)
    s = _letters(rng, 3)
    return f"{k}{s}", _shift_by(s, k)


def _unshift(rng: random.Random) -> tuple[str, str]:
    k = rng.randrange(1, 6)
    s = _letters(rng, 3)
    return f"{k}{s}", _shift_by(s, -k)


def _count(letter: str) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        s = "".join(rng.choice("abc") for _ in range(8))
        return s, str(s.count(letter))

    return make


def _smallest(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 5)
    return s, "".join(sorted(s)[:3])


def _largest(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 5)
    return s, "".join(sorted(s, reverse=True)[:3])


def _max(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 6)
    return s, max(s)


# Tasks come in pairs that read the same kind of input and differ in the answer (shift
# and unshift, count a's and b's, smallest and largest), so their experts compete for
# the same weights; the base learns some tasks well (max) and others partly (mul).
TASKS: tuple[Task, ...] = (
    Task("mul", "mul", "last digit of a*b, two 2-digit numbers (1 char)", _mul),
    Task("shift", "rot", "3 letters each shifted forward by k in 1..5 (3 chars)", _shift),
    Task("unshift", "unr", "3 letters each shifted back by k in 1..5 (3 chars)", _unshift),
    Task("count_a", "cna", "how many a's among 8 letters from abc (1 char)", _count("a")),
    Task("count_b", "cnb", "how many b's among 8 letters from abc (1 char)", _count("b")),
    Task("smallest", "low", "the 3 smallest of 5 digits, ascending (3 chars)", _smallest),
    Task("largest", "top", "the 3 largest of 5 digits, descending (3 chars)", _largest),
    Task("max", "max", "the largest of 6 digits (1 char)", _max),
)
TASK_BY_NAME = {task.name: task for task in TASKS}


def _draw(task: Task, rng: random.Random, n: int, avoid: set[str]) -> list[Example]:
    out: list[Example] = []
    seen = set(avoid)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"task {task.name}: cannot draw {n} distinct examples")
        example = task.sample(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out


@dataclass
class Splits:
    """Validation and test examples per task, disjoint from each other and from training."""

    val: dict[str, list[Example]]
    test: dict[str, list[Example]]
    seed: int

    def identity(self) -> dict[str, object]:
        """What determines the split: its sizes, seed and tasks (checked by the model cache)."""
        first = next(iter(self.test))
        return {
            "n_val": len(self.val[first]),
            "n_test": len(self.test[first]),
            "seed": self.seed,
            "tasks": {t.name: t.description for t in TASKS},
        }

    def held_out(self, task: str) -> set[str]:
        return {e.prompt for e in self.val[task]} | {e.prompt for e in self.test[task]}


def make_splits(n_val: int, n_test: int, seed: int) -> Splits:
    """Fixed-seed validation and test sets: test drawn first, validation avoids it."""
    val: dict[str, list[Example]] = {}
    test: dict[str, list[Example]] = {}
    for index, task in enumerate(TASKS):
        test[task.name] = _draw(task, random.Random(seed * 1000 + 2 * index), n_test, set())
        avoid = {e.prompt for e in test[task.name]}
        val[task.name] = _draw(task, random.Random(seed * 1000 + 2 * index + 1), n_val, avoid)
    return Splits(val, test, seed)


class TrainStream:
    """Endless training examples of some tasks, never a validation or test prompt."""

    def __init__(self, tasks: Sequence[str], splits: Splits, seed: int) -> None:
        self.tasks = [TASK_BY_NAME[name] for name in tasks]
        self.avoid = {name: splits.held_out(name) for name in tasks}
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[Example]:
        out = []
        while len(out) < size:
            task = self.rng.choice(self.tasks)
            example = task.sample(self.rng)
            if example.prompt not in self.avoid[task.name]:
                out.append(example)
        return out
