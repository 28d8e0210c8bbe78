"""A search's run directory: which run it holds, and the history of its evaluations.

* ``run.json``: the run's identity, a JSON object the command gives (its config,
  objective and settings, without the budget, so that a larger budget extends a run),
  plus what the first run decided for good (:meth:`RunDirectory.remember`). Reopening
  the directory for another identity is refused, naming what differs. This module is
  the only writer of the file.
* ``history.jsonl``: one JSON row per evaluation, with an integer ``index``, appended as
  each finishes and flushed to disk at once (:meth:`RunDirectory.append`), so Ctrl-C or
  a crash loses nothing. Rows may come in any order (a parallel evaluator writes them as
  they finish); they are read back by index, and a line cut by a crash is dropped.

One process at a time: the directory is locked while it is open (``folder_lock``), so a
second run started on it is refused at once, and the lock goes with its process.

A rerun replays the recorded rows (:meth:`RunDirectory.replay`) to a search that asks
for the same candidates again, and evaluates only what is missing. The directory does
not know what a candidate is: the command passes ``parse`` (a row to its record) and
its records have an ``index`` and ``to_row()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from mergekit_pcb import folder_lock

LOG = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"


class RunMismatchError(RuntimeError):
    """The directory holds another run, or more than the budget allows."""


class Row(Protocol):
    """A record a run directory can store: its index, and its JSON row."""

    @property
    def index(self) -> int: ...

    def to_row(self) -> dict[str, Any]: ...


class Indexed(Protocol):
    @property
    def index(self) -> int: ...


R = TypeVar("R", bound=Row)
C = TypeVar("C", bound=Indexed)


def sha256_file(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: never half-written."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


def _json_round_trip(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_differences(recorded: dict, identity: dict) -> list[str]:
    """``key old -> new`` for every setting that differs between two run identities."""
    old, new = _flatten(recorded), _flatten(_json_round_trip(identity))
    return [
        f"{key} {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def read_history(path: str, parse: Callable[[dict[str, Any]], R]) -> dict[int, R]:
    """The records in the history file ``path`` by index.

    A line that is not JSON (cut by a crash), or a row that ``parse`` refuses with a
    TypeError (a row of another program), is dropped: its candidate is scored again.
    """
    recorded: dict[int, R] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                if not line.strip():
                    continue
                try:
                    record = parse(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue
                recorded[record.index] = record
    return recorded


class RunDirectory(Generic[R]):
    """An open run directory: ``run_json`` (what ``run.json`` holds) and the ``recorded``
    rows of ``history.jsonl`` by index."""

    def __init__(self, path: str, run_json: dict[str, Any], recorded: dict[int, R]):
        self.path = path
        self.run_json = run_json
        self.recorded = recorded
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str,
        identity: dict[str, Any],
        parse: Callable[[dict[str, Any]], R],
        *,
        what: str = "tuning run",
    ) -> RunDirectory[R]:
        """Create ``path`` for the run ``identity``, or reopen it for the same run.

        Refuses a directory that another process has open, or that holds another run
        (``what``: how the refusal names it), naming every setting that differs. Cheap:
        callers open the directory before any heavy work, so that a wrong one is refused
        at once. The directory stays locked until :meth:`close` (or the end of a
        ``with`` block, or of the process).
        """
        os.makedirs(path, exist_ok=True)
        folder_lock.acquire(
            path,
            f"{path} is in use by another {what} that is still running; wait for it to end, "
            "or use another output directory",
        )
        try:
            return cls._read(path, identity, parse, what)
        except BaseException:
            folder_lock.release(path)
            raise

    @classmethod
    def _read(
        cls,
        path: str,
        identity: dict[str, Any],
        parse: Callable[[dict[str, Any]], R],
        what: str,
    ) -> RunDirectory[R]:
        run_path = os.path.join(path, RUN_FILE)
        if os.path.exists(run_path):
            with open(run_path, encoding="utf-8") as file:
                run_json = json.load(file)
            recorded_identity = {k: v for k, v in run_json.items() if k in identity}
            if recorded_identity != _json_round_trip(identity) or set(identity) - set(run_json):
                raise RunMismatchError(
                    f"{path} holds a different {what} (differs in: "
                    f"{'; '.join(describe_differences(recorded_identity, identity))}); "
                    "use another output directory, or delete this one to start over"
                )
            run = cls(path, run_json, {})
        else:
            run = cls(path, _json_round_trip(identity), {})
            run._write_run_json()
        run.recorded = read_history(run.history_path, parse)
        return run

    def close(self) -> None:
        """Release the directory for other processes (once per :meth:`open`)."""
        if not self._closed:
            self._closed = True
            folder_lock.release(self.path)

    def __enter__(self) -> RunDirectory[R]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def history_path(self) -> str:
        return os.path.join(self.path, HISTORY_FILE)

    @property
    def done(self) -> int:
        """How many rows are recorded without a gap from index 0."""
        done = 0
        while done in self.recorded:
            done += 1
        return done

    def check_budget(
        self, budget: int, *, option: str = "--budget", unit: str = "evaluations"
    ) -> None:
        """Refuse a ``budget`` below the rows already recorded (it would lose them)."""
        done = self.done
        if done > budget:
            raise RunMismatchError(
                f"{self.path} already holds {done} {unit}, more than {option} {budget}; "
                f"give a budget of at least {done} to extend the run"
            )

    def remember(self, **entries: Any) -> None:
        """Add what the first run decided (not part of the identity) to ``run.json``."""
        self.run_json.update(_json_round_trip(entries))
        self._write_run_json()

    def _write_run_json(self) -> None:
        """The one writer of ``run.json``."""
        write_atomic(
            os.path.join(self.path, RUN_FILE),
            json.dumps(self.run_json, indent=2, sort_keys=True) + "\n",
        )

    def drop_cut_lines(self) -> None:
        """Rewrite the history with the rows read back, in index order: a line cut by a
        crash would otherwise sit before the rows this run appends."""
        rows = sorted(self.recorded.values(), key=lambda record: record.index)
        write_atomic(self.history_path, "".join(json.dumps(r.to_row()) + "\n" for r in rows))

    def replay(
        self, candidates: Sequence[C], matches: Callable[[R, C], bool]
    ) -> tuple[dict[int, R], list[C]]:
        """The recorded rows of ``candidates`` by index, and the candidates not recorded.

        A recorded row that does not ``match`` its candidate means that another run
        wrote the history: refused.
        """
        replayed: dict[int, R] = {}
        missing: list[C] = []
        for candidate in candidates:
            record = self.recorded.get(candidate.index)
            if record is None:
                missing.append(candidate)
            elif matches(record, candidate):
                replayed[candidate.index] = record
            else:
                raise RunMismatchError(
                    f"{self.history_path}: evaluation {candidate.index} does not match the "
                    "candidate the search asks for; the history was not written by this run"
                )
        return replayed, missing

    def append(self, record: R) -> None:
        """Append ``record`` to the history, on disk before this returns."""
        with open(self.history_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record.to_row()) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.recorded[record.index] = record

