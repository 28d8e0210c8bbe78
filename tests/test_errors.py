"""Bad input worded once: config checks, pydantic errors in one line, one-line commands."""

from __future__ import annotations

import json
import logging

import click
import pytest
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from mergekit_pcb.cli import one_line, reported_errors
from mergekit_pcb.config_check import check_model_paths, check_pcb_config
from mergekit_pcb.errors import ConfigError, describe_validation_error, field_path
from mergekit_pcb.merge import remove_stale_weights


def _model_folder(path) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return str(path)


def _config(base: str, *models: str) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {"merge_method": "pcb", "base_model": base, "models": [{"model": m} for m in models]}
    )


def _schema_error(raw: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        MergeConfiguration.model_validate(raw)
    return caught.value


def test_field_path_reads_like_the_config():
    assert field_path(("models", 1, "parameters")) == "models[1].parameters"
    assert field_path(()) == "top level"


def test_validation_error_in_one_line():
    missing = _schema_error({"merge_method": "pcb", "base_model": "b", "models": [{"mdl": "x"}]})
    assert describe_validation_error(missing) == "models[0].model: required, but missing"
    wrong = _schema_error({"merge_method": "pcb", "base_model": "b", "models": 5})
    assert describe_validation_error(wrong) == "models: Input should be a valid list (got 5)"
    assert "\n" not in describe_validation_error(wrong) and "\n" in str(wrong)


def test_existing_folders_and_hub_ids_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _model_folder(tmp_path / "base")
    # a valid repo id that is not here is left to mergekit (no network needed to check)
    check_model_paths(_config(base, "some-org/some-model", "plain-name"))


def test_missing_folder_is_refused(tmp_path):
    base = _model_folder(tmp_path / "base")
    with pytest.raises(ConfigError) as caught:
        check_model_paths(_config(base, str(tmp_path / "gone")))
    assert str(caught.value) == (
        f"model {tmp_path / 'gone'}: no such folder, and not a Hugging Face repo id"
    )


def test_folder_without_config_and_a_file_are_not_models(tmp_path):
    base = _model_folder(tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: a folder without config.json, not a model$"):
        check_model_paths(_config(base, str(tmp_path / "empty")))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"weights.safetensors: a file, not a model folder$"):
        check_model_paths(_config(base, str(tmp_path / "weights.safetensors")))


def test_tilde_is_not_expanded_by_mergekit(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    base = _model_folder(tmp_path / "base")
    _model_folder(tmp_path / "ft")
    with pytest.raises(ConfigError, match=r"model ~/ft: .*does not expand '~': write the full"):
        check_model_paths(_config(base, "~/ft"))


def test_missing_lora_is_refused(tmp_path):
    base = _model_folder(tmp_path / "base")
    model = _model_folder(tmp_path / "ft")
    with pytest.raises(
        ConfigError, match=rf"^LoRA {tmp_path}/no-lora \(of model {model}\): no such folder"
    ):
        check_model_paths(_config(base, f"{model}+{tmp_path / 'no-lora'}"))


def _pcb(models: list[dict], **shared) -> dict:
    return {"merge_method": "pcb", "base_model": "b", "models": models, "parameters": shared}


@pytest.mark.parametrize(
    ("setting", "accepted"),
    [
        ({"density": 1.0}, True),
        ({"density": 0.0}, False),
        ({"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.0}]}, False),
        ({"weight": -2.5}, True),
        ({"weight": float("inf")}, False),
        ({"weight": "1.5"}, True),  # pydantic's lax float, as mergekit reads it
        ({"weight": "heavy"}, False),
    ],
)
def test_per_model_values_follow_the_spec(setting, accepted):
    raw = _pcb([{"model": "m", "parameters": setting}])
    key = next(iter(setting))
    if accepted:
        check_pcb_config(raw)
    else:
        with pytest.raises(ValueError, match=rf"^models\[0\] \(model m\): pcb parameter '{key}'"):
            check_pcb_config(raw)


@pytest.mark.parametrize(
    ("setting", "accepted"),
    [
        ({"scope": "model"}, True),
        ({"scope": "Model"}, False),
        ({"clamp_ratio": 0.5}, False),
        ({"lambda": float("-inf")}, False),
        ({"inter_balance": False}, True),
    ],
)
def test_shared_values_follow_the_spec(setting, accepted):
    raw = _pcb([{"model": "m"}], **setting)
    key = next(iter(setting))
    if accepted:
        check_pcb_config(raw)
    else:
        with pytest.raises(ValueError, match=rf"^top level: pcb parameter '{key}'"):
            check_pcb_config(raw)


def test_negative_weight_is_one_warning_per_model(caplog):
    raw = _pcb(
        [
            {"model": "a", "parameters": {"weight": [-1.0, -0.5, 2.0]}},  # a gradient
            {"model": "b", "parameters": {"weight": 0.5}},
        ]
    )
    with caplog.at_level(logging.WARNING, logger="mergekit_pcb"):
        warnings = check_pcb_config(raw)
    expected = [
        "models[0] (model a): weight -1 is negative, so this model's task vector is "
        "subtracted, not added"
    ]
    assert warnings == expected
    assert [r.getMessage() for r in caplog.records] == expected
    everyone = check_pcb_config(_pcb([{"model": "a"}], weight=-1))
    assert everyone == [
        "top level: weight -1 is negative, so every model's task vector is subtracted, not added"
    ]


def test_one_line_keeps_the_first_and_last_line():
    error = RuntimeError(
        "every candidate failed; the first error was:\nTraceback\n  x\nKeyError: 'y'"
    )
    assert one_line(error) == "every candidate failed; the first error was: KeyError: 'y'"
    assert one_line(ValueError("plain")) == "plain"


@pytest.mark.parametrize("error", [ValueError("v"), RuntimeError("r"), OSError("o")])
def test_reported_errors_become_click_errors_unless_debugging(error):
    with pytest.raises(click.ClickException) as caught, reported_errors(False, prefix="p: "):
        raise error
    assert caught.value.message == f"p: {error}"
    with pytest.raises(type(error)), reported_errors(True):
        raise error
    with pytest.raises(KeyError), reported_errors(False):  # a bug is not hidden
        raise KeyError("k")


def test_only_mergekit_weight_names_are_removed(tmp_path):
    names = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model-00001-of-00012.bin",
        "model-3.safetensors",
        "notes.txt",
        "model.safetensors.json",
        "model-00001-of-00002.bin",
        "optimizer.bin",
        "consolidated.safetensors",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / "model-00009-of-00009.safetensors").mkdir()  # a folder is never removed
    removed = remove_stale_weights(str(tmp_path), keep={"model.safetensors"})
    assert removed == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-3.safetensors",
        "model.safetensors.index.json",
        "pytorch_model-00001-of-00012.bin",
    ]
    kept = ["model.safetensors", "notes.txt", "model.safetensors.json"]
    kept += ["model-00001-of-00002.bin", "optimizer.bin", "consolidated.safetensors"]
    kept += ["model-00009-of-00009.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_mergekit_without_the_method_registry_is_named_with_the_version_needed(monkeypatch):
    import types

    from mergekit import merge_methods

    from mergekit_pcb.errors import require_method_registry
    from mergekit_pcb.method import register

    require_method_registry(merge_methods)  # mergekit 0.1.5 has it
    old = types.SimpleNamespace(get=lambda name: None)  # 0.1.4's module: no register()
    with pytest.raises(ImportError, match=r"needs mergekit 0\.1\.5 or later.*>=0\.1\.5'$"):
        require_method_registry(old)
    monkeypatch.delattr(merge_methods, "register")
    with pytest.raises(ImportError, match=r"^mergekit-pcb needs mergekit 0\.1\.5 or later"):
        register()
