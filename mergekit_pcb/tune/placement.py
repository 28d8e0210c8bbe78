"""Where each tensor's contributions live: beside their parameter, in CPU memory, or on disk.

:func:`placement_for` gives every device a byte budget (a GPU: its free memory less a
share kept for the objective; the CPU: half the RAM); :class:`Placement` then chooses
each tensor's place within those budgets, and :func:`place` puts the tensor's terms
there. The capture (``capture.py``) and every Ray worker (``parallel.py``) place terms
through :func:`place`, so that a worker places them as the serial tuner does.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from mergekit_pcb.tune.contributions import DiskStore, TensorTerms

LOG = logging.getLogger(__name__)

PlacementMode = Literal["auto", "device", "cpu", "disk"]
#: Share of a GPU's memory left free for the objective when placing contributions.
OBJECTIVE_ROOM = 0.25


@dataclass
class Placement:
    """Chooses where each tensor's contributions live, within byte budgets per device.

    ``mode``: ``device`` keeps them beside their parameter, ``cpu`` in CPU memory,
    ``disk`` on disk; ``auto`` beside the parameter while that device's budget lasts,
    then in CPU memory while its budget lasts, then on disk.
    """

    mode: PlacementMode = "auto"
    budgets: dict[str, int] = field(default_factory=dict)  # bytes left, per device name
    used: Counter = field(default_factory=Counter)

    def choose(self, nbytes: int, device: torch.device | str) -> str:
        """A device name (``cuda:0``, ``cpu``) or ``disk`` for ``nbytes`` of terms."""
        device = str(device)
        if self.mode == "disk":
            target = "disk"
        elif self.mode == "cpu":
            target = "cpu"
        elif self.mode == "device":
            target = device
        else:
            target = next(
                (d for d in dict.fromkeys((device, "cpu")) if self.budgets.get(d, 0) >= nbytes),
                "disk",
            )
        if target in self.budgets:
            self.budgets[target] -= nbytes
        self.used[target] += nbytes
        return target

    def describe(self) -> str:
        parts = [f"{_gib(n)} on {where}" for where, n in sorted(self.used.items()) if n]
        left = [
            f"{_gib(n)} left free on {d}" for d, n in sorted(self.budgets.items()) if d != "cpu"
        ]
        return ", ".join(parts + left) or "nothing stored"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def free_memory(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes on ``device`` (for the CPU: half the RAM counts as free)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 2, total


def placement_for(
    mode: str,
    devices: Sequence[torch.device | str],
    memory: Callable[[torch.device], tuple[int, int]] = free_memory,
    objective_room: float = OBJECTIVE_ROOM,
) -> Placement:
    """A :class:`Placement` with a byte budget per device.

    A GPU's budget is its free memory less ``objective_room`` of its total, kept for
    the objective's activations; the CPU's is half its RAM.
    """
    budgets = {}
    for device in {torch.device(d) for d in [*devices, "cpu"]}:
        free, total = memory(device)
        room = 0 if device.type == "cpu" else int(objective_room * total)
        budgets[str(device)] = max(0, free - room)
        if device.type != "cpu":
            LOG.info(
                "%s: %.2f GiB free; contributions may take %.2f GiB of it, leaving %.2f GiB "
                "for the objective",
                device,
                free / 2**30,
                budgets[str(device)] / 2**30,
                (free - budgets[str(device)]) / 2**30,
            )
    return Placement(mode=mode, budgets=budgets)


def place(
    placement: Placement,
    name: str,
    terms: TensorTerms,
    device: torch.device | str,
    disk: DiskStore | None,
    *,
    copy: bool,
) -> TensorTerms:
    """Tensor ``name``'s ``terms``, for a parameter on ``device``, where ``placement``
    chooses: the base goes with the rows, since a candidate needs both in one place.

    Terms already on disk stay there. Terms chosen for a device are moved there;
    ``copy``: copy the base there even where it already is (the capture's terms hold
    mergekit's own tensor). Terms chosen for disk go into the ``disk`` store; with none
    (a Ray worker, which writes no shards) they stay as they are, in this process's
    memory.
    """
    if terms.on_disk:
        return terms
    target = placement.choose(terms.stored_bytes, device)
    if target != "disk":
        return terms.to(target, copy=copy)
    if disk is None:
        return terms
    return disk.add(name, terms)
