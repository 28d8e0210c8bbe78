"""A stand-in for tqdm that records each progress bar's total and how far it went."""

from __future__ import annotations

from typing import ClassVar


class RecordingBar:
    """Records every bar made (``RecordingBar.made``; clear it first), as iterable or manual.

    ``first_total`` is the total the bar was made with, ``total`` its total now, ``n``
    how far it went (items iterated, or the sum of ``update`` calls).
    """

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, iterable=None, *args, total: int | None = None, **kwargs):
        self.iterable = iterable
        self.first_total, self.total, self.n = total, total, 0
        RecordingBar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            self.n += 1
            yield item

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
