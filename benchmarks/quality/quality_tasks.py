"""The generated tasks of the quality study, and their disjoint train / val / test splits.

Every task is a family of six related functions picked by a key ``k`` in 1..6 that is
part of the prompt (``rot3 abc=`` shifts ``abc`` by 3). The base model trains on keys 1
to 3 of every task (``BASE_KEYS``); each expert trains on all six keys of its task (and
replays the base's mixture: ``TrainStream``'s ``replay``). So the base can know at most
half of every task and is near chance on the other half, an expert learns the rest of
its task, and what a merge keeps of each expert's new half is visible in the score
(per-character accuracy over short answers, smooth in how much was kept).

Splits are drawn with fixed seeds over all keys: the test set first, then the
validation set avoiding it; training examples are drawn on the fly and never equal a
validation or test prompt.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits
KEYS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
BASE_KEYS: tuple[int, ...] = (1, 2, 3)
# One fixed letter substitution per key for the enc / dec pair.
_CIPHERS = {k: "".join(random.Random(100 + k).sample(LETTERS, len(LETTERS))) for k in KEYS}
# One fixed keyword of three shifts per key for the Vigenere pair (shift i for letter i).
_KEYWORDS = {k: tuple(random.Random(200 + k).sample(range(1, 26), 3)) for k in KEYS}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    key: int


@dataclass(frozen=True)
class Task:
    """A named family of generators of (input, answer) pairs, one per key."""

    name: str
    tag: str
    description: str
    make: Callable[[random.Random, int], tuple[str, str]]

    def sample(self, rng: random.Random, keys: Sequence[int] = KEYS) -> Example:
        key = rng.choice(keys)
        given, answer = self.make(rng, key)
        return Example(f"{self.tag}{key} {given}=", answer, key)


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _shift_by(s: str, k: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def _shift(rng: random.Random, k: int) -> tuple[str, str]:
    s = _letters(rng, 3)
    return s, _shift_by(s, k)


def _unshift(rng: random.Random, k: int) -> tuple[str, str]:
    s = _letters(rng, 3)
    return s, _shift_by(s, -k)


def _encode(rng: random.Random, k: int) -> tuple[str, str]:
    s = _letters(rng, 3)
    return s, "".join(_CIPHERS[k][LETTERS.index(c)] for c in s)


def _decode(rng: random.Random, k: int) -> tuple[str, str]:
    s = _letters(rng, 3)
    return s, "".join(LETTERS[_CIPHERS[k].index(c)] for c in s)


def _digit_add(rng: random.Random, k: int) -> tuple[str, str]:
    s = _digits(rng, 3)
    return s, "".join(str((int(c) + k) % 10) for c in s)


def _digit_mul(rng: random.Random, k: int) -> tuple[str, str]:
    s = _digits(rng, 3)
    return s, "".join(str(int(c) * (k + 1) % 10) for c in s)


def _vigenere(sign: int) -> Callable[[random.Random, int], tuple[str, str]]:
    def make(rng: random.Random, k: int) -> tuple[str, str]:
        s = _letters(rng, 3)
        return s, "".join(
            _shift_by(c, sign * shift) for c, shift in zip(s, _KEYWORDS[k], strict=True)
        )

    return make


# Tasks come in pairs that read the same input and differ in the answer, so that their
# experts compete for the same weights.
TASKS: tuple[Task, ...] = (
    Task("shift", "rot", "3 letters each shifted forward by k (3 chars)", _shift),
    Task("unshift", "unr", "3 letters each shifted back by k (3 chars)", _unshift),
    Task("encode", "enc", "3 letters through substitution cipher k (3 chars)", _encode),
    Task("decode", "dec", "3 letters through the inverse of cipher k (3 chars)", _decode),
    Task("digit_add", "dad", "each of 3 digits plus k, mod 10 (3 chars)", _digit_add),
    Task("digit_mul", "dmu", "each of 3 digits times k+1, mod 10 (3 chars)", _digit_mul),
    Task("vigenere", "vig", "3 letters shifted forward by keyword k (3 chars)", _vigenere(1)),
    Task("unvigenere", "unv", "3 letters shifted back by keyword k (3 chars)", _vigenere(-1)),
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
            "keys": list(KEYS),
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
    """Endless training examples of some tasks and keys, never a validation or test prompt.

    With ``replay`` > 0, that fraction of the examples comes from ``replay_tasks`` on
    ``replay_keys`` instead (an expert replaying the base's mixture).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        keys: Sequence[int],
        splits: Splits,
        seed: int,
        replay: float = 0.0,
        replay_tasks: Sequence[str] = (),
        replay_keys: Sequence[int] = (),
    ) -> None:
        if replay and not (replay_tasks and replay_keys):
            raise ValueError("replay needs replay_tasks and replay_keys")
        self.tasks = [TASK_BY_NAME[name] for name in tasks]
        self.keys = tuple(keys)
        self.replay = replay
        self.replay_tasks = [TASK_BY_NAME[name] for name in replay_tasks]
        self.replay_keys = tuple(replay_keys)
        self.avoid = {name: splits.held_out(name) for name in {*tasks, *replay_tasks}}
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[Example]:
        out = []
        while len(out) < size:
            # No draw for the replay coin when there is no replay: the base's stream
            # stays the one it was before replay existed.
            if self.replay and self.rng.random() < self.replay:
                tasks, keys = self.replay_tasks, self.replay_keys
            else:
                tasks, keys = self.tasks, self.keys
            task = self.rng.choice(tasks)
            example = task.sample(self.rng, keys)
            if example.prompt not in self.avoid[task.name]:
                out.append(example)
        return out
