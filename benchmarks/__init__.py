"""The benchmarks, run as modules from the repository root (``python -m benchmarks.X``)."""

from __future__ import annotations

import subprocess


def checkout() -> str:
    """The checkout measured: short commit, ``+dirty`` when the package has edits."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mergekit_pcb"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
