"""The run directory (``run_dir.py``): run.json's identity and refusals, history.jsonl written
row by row and read back after a crash, replay, the budget check; for the tuner's rows
and for another command's."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import pytest

from mergekit_pcb.tune.records import Candidate, Evaluation
from mergekit_pcb.tune.run_dir import (
    HISTORY_FILE,
    RUN_FILE,
    RunDirectory,
    RunMismatchError,
    read_history,
    sha256_file,
    write_atomic,
)

IDENTITY = {"config_sha256": "abc", "models": ["m1", "m2"], "settings": {"seed": 1, "tag": None}}


def _evaluation(index: int, score: float | None = 1.0) -> Evaluation:
    return Evaluation(index, [1.0, float(index)], score, 0.5, 0.25, None, "cma")


def _open(path, identity=IDENTITY) -> RunDirectory[Evaluation]:
    return RunDirectory.open(str(path), identity, Evaluation.from_row)


def _lines(path) -> list[str]:
    return (path / HISTORY_FILE).read_text().splitlines()


def test_a_new_directory_records_its_identity_and_reopens_for_the_same_run(tmp_path):
    run = _open(tmp_path / "run")
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text()) == IDENTITY
    assert run.recorded == {} and run.done == 0
    run.append(_evaluation(0))
    again = _open(tmp_path / "run", {**IDENTITY, "models": ("m1", "m2")})  # as JSON reads it
    assert again.recorded == {0: _evaluation(0)}


@pytest.mark.parametrize(
    ("identity", "differs"),
    [
        ({**IDENTITY, "settings": {"seed": 2, "tag": None}}, "settings.seed 1 -> 2"),
        (
            {**IDENTITY, "models": ["m1"], "settings": {"seed": 1, "tag": "x"}},
            'models ["m1", "m2"] -> ["m1"]; settings.tag null -> "x"',
        ),
        ({**IDENTITY, "objective": "loss"}, 'objective null -> "loss"'),
    ],
)
def test_another_run_is_refused_naming_what_differs(tmp_path, identity, differs):
    _open(tmp_path)
    with pytest.raises(RunMismatchError) as refused:
        _open(tmp_path, identity)
    assert str(refused.value) == (
        f"{tmp_path} holds a different tuning run (differs in: {differs}); use another "
        "output directory, or delete this one to start over"
    )
    assert json.loads((tmp_path / RUN_FILE).read_text()) == IDENTITY  # left as it was


def test_what_the_first_run_decided_is_remembered_apart_from_the_identity(tmp_path):
    run = _open(tmp_path)
    run.remember(scale_search=False)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {**IDENTITY, "scale_search": False}
    again = _open(tmp_path)
    assert again.run_json["scale_search"] is False
    assert not (tmp_path / f"{RUN_FILE}.tmp").exists()


def test_rows_are_on_disk_as_each_is_appended_and_read_back_by_index(tmp_path):
    run = _open(tmp_path)
    for index in (1, 0, 2):  # a parallel evaluator finishes them in any order
        run.append(_evaluation(index, score=index / 2))
        assert len(_lines(tmp_path)) == len(run.recorded)
    assert [json.loads(line)["index"] for line in _lines(tmp_path)] == [1, 0, 2]
    assert read_history(str(tmp_path / HISTORY_FILE), Evaluation.from_row) == {
        i: _evaluation(i, score=i / 2) for i in range(3)
    }
    assert _open(tmp_path).done == 3


def test_a_line_cut_by_a_crash_is_dropped_and_the_history_rewritten_in_order(tmp_path):
    run = _open(tmp_path)
    for index in (1, 0):
        run.append(_evaluation(index))
    whole = json.dumps(asdict(_evaluation(2)))
    with open(tmp_path / HISTORY_FILE, "a", encoding="utf-8") as file:
        file.write("\n" + whole[: len(whole) // 2])  # a blank line, then a cut one
    reopened = _open(tmp_path)
    assert sorted(reopened.recorded) == [0, 1]
    reopened.drop_cut_lines()
    assert _lines(tmp_path) == [json.dumps(asdict(_evaluation(i))) for i in (0, 1)]
    reopened.append(_evaluation(2))
    assert sorted(_open(tmp_path).recorded) == [0, 1, 2]


def test_a_budget_below_the_recorded_rows_is_refused(tmp_path):
    run = _open(tmp_path)
    for index in (0, 1, 2, 4):  # 3 without a gap: 4 waits for 3
        run.append(_evaluation(index))
    assert run.done == 3
    run.check_budget(3)
    with pytest.raises(RunMismatchError) as refused:
        run.check_budget(2)
    assert str(refused.value) == (
        f"{tmp_path} already holds 3 evaluations, more than --budget 2; give a budget of "
        "at least 3 to extend the run"
    )


def test_recorded_rows_are_replayed_and_the_others_left_to_evaluate(tmp_path):
    run = _open(tmp_path)
    run.append(_evaluation(0))
    run.append(_evaluation(2))

    def same(evaluation, candidate):
        return evaluation.weights == candidate.weights

    asked = [Candidate(i, [1.0, float(i)]) for i in range(4)]
    replayed, missing = run.replay(asked, same)
    assert replayed == {0: _evaluation(0), 2: _evaluation(2)}
    assert missing == [asked[1], asked[3]]
    with pytest.raises(RunMismatchError, match=r"evaluation 2 does not match the candidate"):
        run.replay([Candidate(2, [9.0, 9.0])], same)


def test_write_atomic_and_sha256_file(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(str(path), "first\n")
    write_atomic(str(path), "second\n")
    assert path.read_text() == "second\n" and os.listdir(tmp_path) == ["f.txt"]
    assert sha256_file(str(path)) == hashlib.sha256(b"second\n").hexdigest()


# --- another command's rows ------------------------------------------------------


@dataclass
class _Trial:
    """A row of another search: a population of fine-tunes mutated and crossed."""

    index: int
    generation: int
    individual: int
    partner: int | None
    accepted: bool
    score: float | None
    seconds: float

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> _Trial:
        return cls(**row)


def test_another_commands_rows_resume_and_extend_the_same_way(tmp_path):
    identity = {"population": 4, "settings": {"generations": None, "seed": 3}}

    def open_evolution():
        return RunDirectory.open(str(tmp_path), identity, _Trial.from_row, what="evolution run")

    run = open_evolution()
    trials = [
        _Trial(i, i // 2, i % 2, None if i == 0 else 0, i % 3 == 0, i / 4, 0.1) for i in range(3)
    ]
    for trial in trials:
        run.append(trial)
    again = open_evolution()
    assert again.recorded == {t.index: t for t in trials}
    again.check_budget(6, option="--generations", unit="trials")
    with pytest.raises(RunMismatchError, match=r"holds 3 trials, more than --generations 1"):
        again.check_budget(1, option="--generations", unit="trials")
    with pytest.raises(RunMismatchError, match=r"holds a different evolution run .*settings.seed"):
        RunDirectory.open(
            str(tmp_path),
            {**identity, "settings": {"generations": None, "seed": 4}},
            _Trial.from_row,
            what="evolution run",
        )
