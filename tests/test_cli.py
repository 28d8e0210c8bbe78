"""The ``mergekit-pcb`` command, config checks, and plain ``mergekit-yaml`` after install."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_pcb.cli import main
from mergekit_pcb.config_check import check_pcb_config
from tests.conftest import broken_copy, write_config

BIN = os.path.dirname(sys.executable)


def _run(args: list[str]):
    return CliRunner().invoke(main, [*args, "--quiet"], catch_exceptions=False)


def test_wrapper_merges(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    out = tmp_path / "out"
    result = _run([config, str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    # nothing of the staging folder is left beside the output
    assert sorted(os.listdir(tmp_path)) == ["out", "pcb.yml"]


def test_wrapper_replaces_files_in_an_existing_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model.safetensors").write_text("stale")
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    assert _run([config, str(out)]).exit_code == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert "lm_head.weight" in load_file(out / "model.safetensors")  # a real checkpoint now


def test_misspelt_parameter_warns_with_suggestion(tiny_models, tmp_path, caplog):
    config = write_config(
        str(tmp_path / "pcb.yml"),
        tiny_models,
        per_model={"math": {"desnity": 0.1}},
        parameters={"lamda": 1.2},
    )
    with caplog.at_level(logging.WARNING, logger="mergekit_pcb"):
        result = _run([config, str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "unknown pcb parameter 'desnity' is ignored by mergekit; did you mean 'density'?" in (
        caplog.text
    )
    assert f"(model {tiny_models['math']})" in caplog.text
    assert "top level: unknown pcb parameter 'lamda'" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_model": {"code": {"density": 1.5}}}, "'density' must be in (0, 1], got 1.5"),
        ({"parameters": {"clamp_ratio": -1}}, "'clamp_ratio' must be finite and in [0, 0.5)"),
        ({"base_model": None}, "merge_method: pcb needs a base_model"),
    ],
)
def test_bad_config_is_refused_before_writing(tiny_models, tmp_path, overrides, message):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models, **overrides)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [config, str(out)])
    assert result.exit_code != 0
    assert message in result.output
    if "density" in message:
        assert f"(model {tiny_models['code']})" in result.output
    assert not out.exists()


def test_nan_model_fails_and_leaves_output_unchanged(tiny_models, tmp_path):
    broken = broken_copy(
        tiny_models["code"],
        str(tmp_path / "broken"),
        "model.layers.1.mlp.down_proj.weight",
        float("nan"),
    )
    models = {**tiny_models, "code": broken}
    config = write_config(str(tmp_path / "pcb.yml"), models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("previous")
    result = CliRunner().invoke(main, [config, str(out), "--quiet"])
    assert result.exit_code != 0
    assert (
        f"model {broken} has NaN or Inf values in tensor model.layers.1.mlp.down_proj.weight"
        in (result.output)
    )
    assert os.listdir(out) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["broken", "out", "pcb.yml"]


def test_check_ignores_other_methods():
    assert check_pcb_config({"merge_method": "ties", "parameters": {"desnity": 2}}) == []


def test_start_up_hook_is_lazy():
    # The .pth hook must not import torch (seconds) at interpreter start.
    code = "import sys; print('_mergekit_pcb_startup' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.slow
def test_plain_mergekit_yaml_knows_pcb_after_install(tiny_models, tmp_path):
    """One real subprocess: unmodified mergekit-yaml, pcb registered by the start-up hook."""
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models, parameters={"lambda": 1.0})
    out = tmp_path / "merged"
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), config, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    merged = load_file(out / "model.safetensors")
    in_process = tmp_path / "in_process"
    assert _run([config, str(in_process)]).exit_code == 0
    expected = load_file(in_process / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name in merged:
        assert torch.equal(merged[name], expected[name]), name
    # and python -m mergekit_pcb is the same command
    help_text = subprocess.run(
        [sys.executable, "-m", "mergekit_pcb", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Usage: mergekit-pcb" in help_text or "Usage: python -m mergekit_pcb" in help_text
