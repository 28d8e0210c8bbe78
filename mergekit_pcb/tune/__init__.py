"""The search of one ``weight`` per model for a merge linear in them (``mergekit-pcb-tune``)."""
