"""The objective as a command line chooses it: the options, the objectives, their identity.

Any command that scores candidate models with a validation objective takes the same
options (``--objective``, ``--val``, ``--test``, ``--combine``, ``--function``,
``--maximize/--minimize``, ``--lm-eval-task``, ``--lm-eval-limit``)::

    @click.command()
    @objective_options
    def main(objective_spec: ObjectiveOptions, ...) -> None:
        objective, test_objective = objective_spec.build()
        identity = objective_spec.identity()  # for run.json

The decorator gives the command one :class:`ObjectiveOptions` (``objective_spec``)
instead of the eight options.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from mergekit_pcb.tune.run_dir import sha256_file

if TYPE_CHECKING:
    from mergekit_pcb.tune import objectives

#: The kinds whose validation files are scored by this package (and so may have --test).
_FILE_KINDS = ("loss", "exact-match")


def check_apart(val: Sequence[str], test: Sequence[str]) -> None:
    """Refuse a test file that is also a validation file (by path or by content)."""
    val_ids = {os.path.realpath(p): sha256_file(p) for p in val}
    for path in test:
        if os.path.realpath(path) in val_ids or sha256_file(path) in val_ids.values():
            raise ValueError(
                f"test file {path} is also a validation file: tune on validation data only"
            )


def build_objective(
    kind: str,
    val: Sequence[str],
    combine: str,
    function: str | None,
    maximize: bool | None,
    lm_eval_tasks: Sequence[str],
    lm_eval_limit: int | None,
) -> objectives.Objective:
    """The objective of ``--objective kind`` and the options that go with it."""
    from mergekit_pcb.tune import objectives  # here: it imports torch

    normalized = combine == "normalized"
    if kind in _FILE_KINDS:
        if not val:
            raise ValueError(f"--objective {kind} needs at least one --val FILE")
        make = objectives.validation_loss if kind == "loss" else objectives.validation_exact_match
        return make(val, normalized)
    if kind == "function":
        if not function or maximize is None:
            raise ValueError(
                "--objective function needs --function pkg.module:function and "
                "--maximize or --minimize"
            )
        return objectives.load_user_objective(function, maximize)
    if not lm_eval_tasks:
        raise ValueError("--objective lm-eval needs at least one --lm-eval-task")
    return objectives.LmEvalObjective(lm_eval_tasks, lm_eval_limit)


@dataclass(frozen=True)
class ObjectiveOptions:
    """The objective options of one command line (defaults: the options' own)."""

    kind: str = "loss"
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    combine: str = "mean"
    function: str | None = None
    maximize: bool | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None

    def build(self) -> tuple[objectives.Objective, objectives.Objective | None]:
        """The validation objective, and the test objective (None without ``--test``).

        Refuses a test file that is also a validation file, and test files with an
        objective that does not score files.
        """
        check_apart(self.val, self.test)
        objective = build_objective(
            self.kind,
            self.val,
            self.combine,
            self.function,
            self.maximize,
            self.lm_eval_tasks,
            self.lm_eval_limit,
        )
        if self.test and self.kind not in _FILE_KINDS:
            raise ValueError("--test files are scored with --objective loss or exact-match")
        # Test files are only reported (plain mean), for the start and the best candidate.
        test_objective = (
            build_objective(self.kind, self.test, "mean", None, None, (), None)
            if self.test
            else None
        )
        return objective, test_objective

    def identity(self) -> dict[str, Any]:
        """What identifies the objective of a run (in ``run.json``): the options, and
        each validation file by its path and its content's hash."""
        return {
            "kind": self.kind,
            "combine": self.combine,
            "function": self.function,
            "maximize": self.maximize,
            "val": [{"path": p, "sha256": sha256_file(p)} for p in self.val],
            "lm_eval_tasks": list(self.lm_eval_tasks),
        }


_OPTIONS = (
    click.option(
        "--objective",
        "kind",
        type=click.Choice(["loss", "exact-match", "function", "lm-eval"]),
        default="loss",
        show_default=True,
        help="loss: lower is better; exact-match, lm-eval: higher is better; "
        "function: as --maximize/--minimize say",
    ),
    click.option(
        "--val",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False),
        help="validation JSONL file, one per task (prompt/completion or text rows)",
    ),
    click.option(
        "--test",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False),
        help="test JSONL file: scored for the start and the best only, never searched on",
    ),
    click.option(
        "--combine",
        type=click.Choice(["mean", "normalized"]),
        default="mean",
        show_default=True,
        help="normalized: each task divided by the best fine-tune's score",
    ),
    click.option(
        "--function",
        help="your objective, function(model, tokenizer) -> float, as pkg.module:function "
        "or path/to/file.py:function",
    ),
    click.option("--maximize/--minimize", default=None, help="direction of --function"),
    click.option("--lm-eval-task", multiple=True, help="lm-evaluation-harness task (validation!)"),
    click.option(
        "--lm-eval-limit", type=int, default=None, help="score at most this many rows per task"
    ),
)


def objective_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the objective options to a click command (where the decorator stands among
    its options), and pass them to it as one ``objective_spec``."""

    @functools.wraps(command)
    def with_objective_spec(
        *args: Any,
        kind: str,
        val: tuple[str, ...],
        test: tuple[str, ...],
        combine: str,
        function: str | None,
        maximize: bool | None,
        lm_eval_task: tuple[str, ...],
        lm_eval_limit: int | None,
        **kwargs: Any,
    ) -> Any:
        spec = ObjectiveOptions(
            kind=kind,
            val=tuple(val),
            test=tuple(test),
            combine=combine,
            function=function,
            maximize=maximize,
            lm_eval_tasks=tuple(lm_eval_task),
            lm_eval_limit=lm_eval_limit,
        )
        return command(*args, objective_spec=spec, **kwargs)

    for option in reversed(_OPTIONS):
        with_objective_spec = option(with_objective_spec)
    return with_objective_spec
