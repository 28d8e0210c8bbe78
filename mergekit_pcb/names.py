"""The ``pcb`` method's name and parameter names, importable without torch or mergekit.

The commands check a config's keys before they import mergekit (seconds of imports), so
these names live apart from the method's spec in :mod:`mergekit_pcb.method`; a test
keeps the two equal.
"""

from __future__ import annotations

METHOD_NAME = "pcb"

#: Names a user may write under ``parameters:`` for ``pcb``.
PARAMETER_NAMES = frozenset(
    {"weight", "density", "lambda", "clamp_ratio", "scope", "intra_balance", "inter_balance"}
)
