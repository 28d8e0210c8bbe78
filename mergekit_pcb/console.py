"""What the commands print besides their results: log lines and progress bars.

* Log lines read ``warning: ...`` (``info`` lines as the bare message), not logging's
  default ``WARNING:module.name:...``, and are written through ``tqdm.write`` so that
  a line never lands in the middle of a progress bar.
* A progress bar shows unless the command is quiet or ``TQDM_DISABLE`` is set. tqdm
  reads that variable only for a ``disable`` left unset, and the commands (mergekit's
  included) set it, so :func:`bars_disabled` reads it itself. A bar drawn inside a
  mergekit merge (``scope: model``'s statistics) cannot see mergekit's ``--quiet``:
  it shows only while mergekit's own bar does (:func:`nested_bars_disabled`).

Importable without torch or mergekit: the commands configure logging first thing.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

_FALSE = {"", "0", "false", "no", "off"}


class _BarSafeHandler(logging.Handler):
    """A stderr handler that writes around any progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: emit never raises
            self.handleError(record)


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(level: int) -> None:
    """Send every log record at ``level`` or above to stderr as ``warning: message``.

    Called before mergekit is imported: mergekit's own ``logging.basicConfig`` then
    finds a handler and leaves the configuration as it is.
    """
    handler = _BarSafeHandler()
    handler.setFormatter(_LevelPrefix("%(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BarSafeHandler)]:
        root.removeHandler(old)  # configured again (commands run in one test process)
    root.addHandler(handler)
    root.setLevel(level)


def bars_disabled(quiet: bool = False) -> bool:
    """Whether a progress bar should stay hidden: ``quiet``, or ``TQDM_DISABLE`` set."""
    return quiet or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def nested_bars_disabled() -> bool:
    """For a bar drawn inside a mergekit merge: hidden unless an outer bar is showing
    (mergekit's executor bar is not drawn with ``--quiet``) and ``TQDM_DISABLE`` is unset."""
    return bars_disabled() or not any(not bar.disable for bar in list(tqdm._instances))
