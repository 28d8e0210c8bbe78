"""PCB-Merging for mergekit: importing this package registers ``merge_method: pcb``.

``core`` holds the tensor math, ``method`` the mergekit glue, ``cli`` the
``mergekit-pcb`` command, ``tune`` the per-model weight tuner.
"""

from mergekit_pcb.core import PCBOptions, pcb_contributions, pcb_merge
from mergekit_pcb.method import METHOD_NAME, PCBMerge, register

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
