"""The model card of a merge made by ``mergekit-pcb``: a ``pcb`` merge's card names the
plugin and its version; other merges' cards are mergekit's own."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mergekit.card import generate_card

import mergekit_pcb
from mergekit_pcb.cli import main
from mergekit_pcb.merge import read_config
from mergekit_pcb.model_card import card_with_plugin_note, plugin_note
from tests.conftest import write_config


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def test_note_follows_the_paragraph_naming_the_method(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    loaded = read_config(config)
    card = generate_card(loaded.merge_config, loaded.source, name="merged")
    noted = card_with_plugin_note(card, version="9.8.7")
    paragraphs = _paragraphs(noted)
    method = next(i for i, p in enumerate(paragraphs) if p.startswith("This model was merged"))
    assert "[PCB-Merging](https://arxiv.org/abs/2410.02396)" in paragraphs[method]
    assert paragraphs[method + 1] == plugin_note("9.8.7")
    assert "version 9.8.7" in paragraphs[method + 1]
    assert paragraphs[method + 2] == "### Models Merged"
    # Nothing of mergekit's card is lost or moved.
    assert noted.replace("\n\n" + plugin_note("9.8.7"), "", 1) == card


def test_a_card_without_the_method_sentence_gets_the_note_at_the_end():
    assert card_with_plugin_note("# Mine\n\nSome text.\n", "1.0") == (
        "# Mine\n\nSome text.\n\n" + plugin_note("1.0") + "\n"
    )


def _merge(config: str, out, *options: str) -> None:
    result = CliRunner().invoke(main, [config, str(out), "--quiet", *options])
    assert result.exit_code == 0, result.output


def test_a_pcb_merge_card_names_the_plugin_and_its_version(tiny_models, tmp_path):
    out = tmp_path / "out"
    _merge(write_config(str(tmp_path / "pcb.yml"), tiny_models), out)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.count(plugin_note()) == 1
    assert f"mergekit-pcb plugin, version {mergekit_pcb.__version__} of which" in card
    assert "`mergekit-pcb mergekit_config.yml OUTPUT_FOLDER`" in card
    assert (out / "mergekit_config.yml").is_file()  # what the note tells to run


@pytest.mark.parametrize("options", [(), ("--no-write-model-card",)])
def test_other_merges_keep_mergekits_card(options, tiny_models, tmp_path):
    config = write_config(
        str(tmp_path / "ties.yml"),
        tiny_models,
        merge_method="ties",
        parameters={"density": 0.5},
    )
    out = tmp_path / "out"
    _merge(config, out, *options)
    if options:
        assert not (out / "README.md").exists()
    else:
        card = (out / "README.md").read_text(encoding="utf-8")
        assert "mergekit-pcb" not in card
        assert "This model was merged using the" in card


def test_no_card_is_written_for_a_pcb_merge_that_asks_for_none(tiny_models, tmp_path):
    out = tmp_path / "out"
    _merge(write_config(str(tmp_path / "pcb.yml"), tiny_models), out, "--no-write-model-card")
    assert not (out / "README.md").exists()
