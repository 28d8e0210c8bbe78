"""CMA-ES search of the per-model PCB coefficients (``mergekit-pcb-tune``)."""
