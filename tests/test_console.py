"""What the commands print besides results: log lines and when progress bars show."""

from __future__ import annotations

import logging

import pytest
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_pcb import console, method_scope
from mergekit_pcb.merge import read_config
from tests.conftest import write_config

STATS_BAR = "PCB whole-model statistics"


@pytest.mark.parametrize(
    ("value", "disabled"), [(None, False), ("", False), ("0", False), ("1", True), ("True", True)]
)
def test_tqdm_disable_is_read_as_tqdm_reads_it(monkeypatch, value, disabled):
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    assert console.bars_disabled() is disabled
    assert console.bars_disabled(quiet=True)


@pytest.mark.parametrize(
    ("quiet", "env", "shown"), [(False, None, True), (True, None, False), (False, "1", False)]
)
def test_scope_model_bars_follow_quiet_and_tqdm_disable(
    tiny_models, tmp_path, capsys, monkeypatch, quiet, env, shown
):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    config = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, parameters={"lambda": 1.0, "scope": "model"}
    )
    method_scope._cache.clear()  # the statistics are computed (and their bar drawn) anew
    run_merge(read_config(config).merge_config, str(tmp_path / "out"), MergeOptions(quiet=quiet))
    method_scope._cache.clear()  # nor reused by a later test that counts the bars
    assert (STATS_BAR in capsys.readouterr().err) is shown


def test_log_lines_say_their_level_and_not_the_logger(capsys):
    console.configure_logging(logging.INFO)
    logging.getLogger("mergekit_pcb.somewhere").warning("a %s key", "misspelt")
    logging.getLogger("mergekit_pcb.somewhere").info("plain")
    logging.getLogger("mergekit_pcb.somewhere").debug("hidden")
    assert capsys.readouterr().err.splitlines() == ["warning: a misspelt key", "plain"]
