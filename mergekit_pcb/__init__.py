"""PCB-Merging for mergekit: importing this package registers ``merge_method: pcb``.

The math (torch only; no mergekit, no transformers):

* ``pcb``: the PCB steps for one tensor, ``pcb_merge`` and ``pcb_contributions``;
* ``selection``: exact order statistics of a row, and of a stream (``RadixSelect``);
* ``work_buffers``: the per-thread pool of CPU work buffers;
* ``model_stats``: exact whole-model statistics, streamed (``scope: model``).

The mergekit glue:

* ``method``: the ``pcb`` merge method, its parameters and registration;
* ``method_scope``: ``scope: model`` inside a merge (streams the checkpoints once);
* ``config_check``, ``errors``, ``merge``, ``cli`` (the ``mergekit-pcb`` command),
  ``_mergekit_compat`` (the private mergekit APIs used), ``_hook``, ``synthetic``.

The tuner (``mergekit-pcb-tune``): the ``tune`` package.
"""

from mergekit_pcb.method import METHOD_NAME, PCBMerge, register
from mergekit_pcb.pcb import PCBOptions, pcb_contributions, pcb_merge

__version__ = "0.1.0"
__all__ = [
    "METHOD_NAME",
    "PCBMerge",
    "PCBOptions",
    "__version__",
    "pcb_contributions",
    "pcb_merge",
    "register",
]

register()
