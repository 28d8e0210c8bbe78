"""The ``mergekit-pcb`` command, config checks, and plain ``mergekit-yaml`` after install."""

from __future__ import annotations

import json
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
from mergekit_pcb.errors import ConfigError
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


# --- one Error: line for bad input --------------------------------------------------


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def _write_text(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_missing_model_path_is_one_line_naming_it(tiny_models, tmp_path):
    missing = str(tmp_path / "no-such-model")
    config = write_config(str(tmp_path / "pcb.yml"), {**tiny_models, "code": missing})
    result = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert result.exit_code == 1
    # not mergekit's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    assert _error_lines(result) == [
        f"Error: {config}: model {missing}: no such folder, and not a Hugging Face repo id"
    ]
    assert not (tmp_path / "out").exists()


def test_relative_path_under_an_existing_folder_counts_as_local(tiny_models, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    # "models/cdoe" is also a valid Hub repo id: mergekit would try to download it
    config = write_config(str(tmp_path / "pcb.yml"), {**tiny_models, "code": "models/cdoe"})
    result = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = _error_lines(result)
    assert line.startswith(f"Error: {config}: model models/cdoe: no such folder (it looks local")
    assert f"read from the current folder, {tmp_path}" in line


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    config = _write_text(tmp_path / "pcb.yml", "merge_method: pcb\nbase_model: [oops\nx: 1\n")
    result = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = _error_lines(result)
    assert line.startswith(f"Error: {config}: line 3, column 2: not valid YAML: ")
    assert "(while parsing a flow sequence at line 2, column 13)" in line
    assert "<unicode string>" not in result.output


@pytest.mark.parametrize(
    ("overrides", "where", "problem"),
    [
        (
            {"parameters": {"lambda": float("nan")}},
            "top level",
            "pcb parameter 'lambda' must be finite, got nan",
        ),
        (
            {"per_model": {"code": {"weight": float("nan")}}},
            "models[1] (model {code})",
            "pcb parameter 'weight' must be finite, got nan",
        ),
        (
            {"parameters": {"lambda": 1.0, "scope": "modle"}},
            "top level",
            "pcb parameter 'scope' should be 'tensor' or 'model', got 'modle'",
        ),
        (
            {"per_model": {"chat": {"density": [0.2, 1.5]}}},  # a gradient's second point
            "models[2] (model {chat})",
            "pcb parameter 'density' must be in (0, 1], got 1.5",
        ),
        (
            {"parameters": {"intra_balance": "maybe"}},
            "top level",
            "pcb parameter 'intra_balance' should be a valid boolean, unable to interpret "
            "input, got 'maybe'",
        ),
    ],
)
def test_bad_pcb_value_is_one_line_naming_file_model_and_key(
    tiny_models, tmp_path, overrides, where, problem
):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models, **overrides)
    result = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert result.exit_code == 1
    location = where.format(**tiny_models)
    assert _error_lines(result) == [f"Error: {config}: {location}: {problem}"]
    assert not (tmp_path / "out").exists()


def test_schema_error_is_one_line_naming_the_field(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models, base_model={"model": 5})
    result = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert result.exit_code == 1
    assert _error_lines(result) == [
        f"Error: {config}: base_model.model: Input should be a valid dictionary or instance "
        "of ModelPath (got 5)"
    ]


def test_missing_config_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "nope.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert _error_lines(result) == [
        f"Error: {tmp_path / 'nope.yml'}: cannot read the config (No such file or directory)"
    ]


def test_debug_shows_the_original_error(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models, parameters={"lambda": "x"})
    quiet = CliRunner().invoke(main, [config, str(tmp_path / "out")])
    assert isinstance(quiet.exception, SystemExit) and quiet.exit_code == 1
    loud = CliRunner().invoke(main, [config, str(tmp_path / "out"), "--debug"])
    assert isinstance(loud.exception, ConfigError)
    assert "pcb parameter 'lambda' should be a valid number" in str(loud.exception)
    assert "--debug" in CliRunner().invoke(main, ["--help"]).output


def test_negative_weight_is_merged_and_said_once(tiny_models, tmp_path, caplog):
    """Allowed (it subtracts the task vector), with one warning naming the model.

    pcb's result is linear in the weights (the scores do not depend on them), so the
    merges with weight -1, 0 and 1 for one model must satisfy m(-1) + m(1) = 2 m(0).
    """
    merged = {}
    for weight in (-1.0, 0.0, 1.0):
        config = write_config(
            str(tmp_path / f"w{weight}.yml"), tiny_models, per_model={"math": {"weight": weight}}
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_pcb"):
            assert _run([config, str(tmp_path / f"out{weight}")]).exit_code == 0
        negative = [r.getMessage() for r in caplog.records if "is negative" in r.getMessage()]
        if weight < 0:
            assert negative == [
                f"models[0] (model {tiny_models['math']}): weight -1 is negative, so this "
                "model's task vector is subtracted, not added"
            ]
        else:
            assert negative == []
        merged[weight] = load_file(tmp_path / f"out{weight}" / "model.safetensors")
    base = load_file(os.path.join(tiny_models["base"], "model.safetensors"))
    changed = 0
    for name, tensor in merged[0.0].items():
        assert torch.allclose(merged[-1.0][name] + merged[1.0][name], 2 * tensor, atol=1e-6)
        changed += not torch.equal(merged[-1.0][name], merged[1.0][name])
    assert changed > 0 and merged[0.0].keys() <= base.keys()


# --- a stale output folder ------------------------------------------------------------

STALE_SHARDS = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model.bin.index.json",
    "model-2.safetensors",  # a shard's name before mergekit's writer renames it
]
NOT_SHARDS = [
    "keep.txt",
    "my-model.safetensors",
    "model.safetensors.bak",
    "adapter_model.safetensors",
    "model-final.safetensors",
    "training_args.bin",
]


def test_earlier_merge_shards_are_removed_and_logged(tiny_models, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    for name in STALE_SHARDS + NOT_SHARDS:
        (out / name).write_text("earlier")
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    with caplog.at_level(logging.WARNING, logger="mergekit_pcb"):
        assert _run([config, str(out)]).exit_code == 0
    left = set(os.listdir(out))
    assert not left & set(STALE_SHARDS)
    assert all((out / name).read_text() == "earlier" for name in NOT_SHARDS)
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    assert (
        f"{out}: removed {len(STALE_SHARDS)} weight file(s) of the earlier merge that the new "
        f"one does not replace: {', '.join(sorted(STALE_SHARDS))}"
    ) in caplog.text


def test_a_sharded_merge_replaces_a_single_file_one(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    out = tmp_path / "out"
    assert _run([config, str(out)]).exit_code == 0
    single = load_file(out / "model.safetensors")
    assert _run([config, str(out), "--out-shard-size", "100K"]).exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    weights = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert weights == shards  # no model.safetensors left beside the shards
    for shard in shards:
        for name, tensor in load_file(out / shard).items():
            assert index["weight_map"][name] == shard
            assert torch.equal(tensor, single[name])
