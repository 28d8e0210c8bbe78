"""The evolution's settings as a command gives them, checked without torch or mergekit.

:class:`EvolveSettings` holds ``--generations``, ``--f``, ``--cr``, ``--seed``, ``--mode``
and ``--budget``; :meth:`EvolveSettings.check` refuses a value outside its range naming
the option, before any model is read, and :meth:`EvolveSettings.identity` is what of
them a run directory keeps (what a resumed run must share with the first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES = ("merged", "individual")


@dataclass(frozen=True)
class EvolveSettings:
    """The evolution's settings (defaults: the authors' code's ``f``, ``cr`` and 15
    generations); ``budget`` caps the evaluations (None: every generation's)."""

    generations: int = 15
    f: float = 0.5
    cr: float = 0.5
    seed: int = 0
    mode: str = "merged"
    budget: int | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the option of the first value out of range."""
        if self.generations < 0:
            raise ValueError(f"--generations must be 0 or more, got {self.generations}")
        if not 0.0 <= self.f <= 1.0:
            raise ValueError(f"--f must be in [0, 1], got {self.f!r}")
        # cr = 0 would leave every offspring equal to its parent: a run that never moves.
        if not 0.0 < self.cr <= 1.0:
            raise ValueError(f"--cr must be in (0, 1], got {self.cr!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {self.seed}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--budget must be 1 or more, got {self.budget}")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the first.

        The budget is left out, so that a larger one extends a run. In ``merged`` mode
        the generations are too: the candidates of a generation do not depend on how
        many follow it. In ``individual`` mode the partner choice does (exploration
        falls as the last generation nears), so there the generations stay.
        """
        kept: dict[str, Any] = {"f": self.f, "cr": self.cr, "seed": self.seed, "mode": self.mode}
        if self.mode == "individual":
            kept["generations"] = self.generations
        return kept
