"""What the model card of a ``pcb`` merge says beyond mergekit's own card.

mergekit writes ``README.md`` (the model card) and ``mergekit_config.yml`` into the
output of a merge. A reader of a ``pcb`` merge's card must also learn that ``pcb`` is
not one of mergekit's methods, so that reproducing the merge needs this plugin, and
which version of it made the merge. Pure text; :mod:`mergekit_pcb.merge` applies it.
"""

from __future__ import annotations

import os

from mergekit_pcb import __version__
from mergekit_pcb.names import METHOD_NAME

#: The sentence of mergekit's card template (mergekit/card.py) that names the method.
_METHOD_SENTENCE = "This model was merged using the "


def plugin_note(version: str = __version__) -> str:
    """The paragraph added to the card of a ``pcb`` merge."""
    return (
        f"The `{METHOD_NAME}` merge method is not part of mergekit: it comes from the "
        f"mergekit-pcb plugin, version {version} of which made this merge. To reproduce "
        "it, install mergekit-pcb beside mergekit and run "
        "`mergekit-pcb mergekit_config.yml OUTPUT_FOLDER` (with the plugin installed, "
        f"plain `mergekit-yaml` knows `{METHOD_NAME}` too)."
    )


def card_with_plugin_note(card: str, version: str = __version__) -> str:
    """``card`` with :func:`plugin_note` as a paragraph of its own right after the
    paragraph naming the merge method, or at the end if the card has none."""
    note = plugin_note(version)
    start = card.find(_METHOD_SENTENCE)
    if start < 0:
        return card.rstrip("\n") + "\n\n" + note + "\n"
    end = card.find("\n\n", start)
    if end < 0:
        return card.rstrip("\n") + "\n\n" + note + "\n"
    return card[:end] + "\n\n" + note + card[end:]


def add_plugin_note(model_folder: str, merge_method: str) -> bool:
    """Add the note to ``model_folder``'s card when the merge used ``pcb`` and mergekit
    wrote a card (``--no-write-model-card`` writes none); say whether it did."""
    card_path = os.path.join(model_folder, "README.md")
    if merge_method != METHOD_NAME or not os.path.isfile(card_path):
        return False
    with open(card_path, encoding="utf-8") as file:
        card = file.read()
    with open(card_path, "w", encoding="utf-8") as file:
        file.write(card_with_plugin_note(card))
    return True
