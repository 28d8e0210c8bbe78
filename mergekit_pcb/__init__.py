"""PCB-Merging for mergekit: the ``pcb`` merge method, registered whenever mergekit merges.

The math (torch only; no mergekit, no transformers):

* ``pcb``: the PCB steps for one tensor, ``pcb_merge`` and ``pcb_contributions``;
* ``selection``: exact order statistics of a row, and of a stream (``RadixSelect``);
* ``work_buffers``: the per-thread pool of CPU work buffers;
* ``model_stats``: exact whole-model statistics, streamed (``scope: model``).

The mergekit glue:

* ``method``: the ``pcb`` merge method, its parameters and registration (``names``: its
  name and parameter names, importable without torch);
* ``method_scope``: ``scope: model`` inside a merge (streams the checkpoints once);
* ``config_check``, ``errors``, ``merge``, ``merge_options``, ``model_card``, ``cli``
  (the ``mergekit-pcb`` command), ``_mergekit_compat`` (the private mergekit APIs used),
  ``_hook``, ``synthetic``.

The tuner (``mergekit-pcb-tune``): the ``tune`` package. The evolver's engine: the
``evolve`` package (``offspring`` and ``evolver`` are math and logic; ``population`` and
``population_merge`` glue).

Importing this package is cheap (no torch, no mergekit): the public names below are
loaded on first use, and ``pcb`` is registered with mergekit as soon as mergekit's merge
methods are imported (at once if they already are), through the same one-shot import
hook that the installed start-up file sets up.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "PCBOptions": "mergekit_pcb.pcb",
    "pcb_contributions": "mergekit_pcb.pcb",
    "pcb_merge": "mergekit_pcb.pcb",
    "PCBMerge": "mergekit_pcb.method",
    "register": "mergekit_pcb.method",
    "METHOD_NAME": "mergekit_pcb.names",
}

__all__ = [
    "METHOD_NAME",
    "PCBMerge",
    "PCBOptions",
    "__version__",
    "pcb_contributions",
    "pcb_merge",
    "register",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_pcb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if "mergekit.merge_methods" in sys.modules:
    from mergekit_pcb.method import register as _register

    _register()
else:
    try:
        from mergekit_pcb._hook import _mergekit_pcb_startup as _startup
    except ImportError:  # a built wheel carries the hook at the top of site-packages only
        import _mergekit_pcb_startup as _startup
    _startup.install()  # one hook at most: a no-op when the start-up file installed it
