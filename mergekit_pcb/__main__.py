"""``python -m mergekit_pcb``: the ``mergekit-pcb`` command."""

from mergekit_pcb.cli import main

main()
