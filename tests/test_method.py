"""The ``pcb`` mergekit method: parameters, errors, registration, end-to-end merges,
and ``scope: model`` inside a merge."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import yaml
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_state_dicts, merge_tensors
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mergekit_pcb
from mergekit_pcb import method_scope, model_stats
from mergekit_pcb.method import DEFAULT_DENSITY, PCBMerge, register
from tests.bars import RecordingBar
from tests.conftest import write_config
from tests.reference_pcb import reference_pcb, relative_error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tensors(n: int = 3, shape=(12, 20), seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return [base.to(dtype)] + [
        (base + 0.05 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(n)
    ]


def test_pcb_is_registered_with_its_parameters():
    method = merge_methods.get("pcb")
    assert isinstance(method, PCBMerge)
    defaults = {p.name: p.default for p in method.spec.parameters}
    assert defaults == {
        "weight": 1.0,
        "density": DEFAULT_DENSITY,
        "lambda": 1.0,
        "clamp_ratio": 0.01,
        "scope": "tensor",
        "intra_balance": True,
        "inter_balance": True,
    }


def test_merge_tensors_matches_reference_with_per_model_parameters():
    tensors = _tensors(3)
    weights, densities = [1.5, 0.7, 1.1], [0.1, 0.3, 0.2]
    merged = merge_tensors(
        tensors,
        "pcb",
        base_index=0,
        parameters={"weight": weights, "density": densities, "lambda": 0.9, "clamp_ratio": 0.02},
    )
    expected = reference_pcb(tensors[0], tensors[1:], weights, densities, 0.9, 0.02)
    torch.testing.assert_close(merged, expected.float(), rtol=0, atol=1e-6)


def test_ablation_switches_reach_the_math():
    tensors = _tensors(3, seed=2)
    for intra, inter in [(False, True), (True, False)]:
        merged = merge_tensors(
            tensors,
            "pcb",
            base_index=0,
            parameters={"intra_balance": intra, "inter_balance": inter},
        )
        expected = reference_pcb(
            tensors[0], tensors[1:], [1.0] * 3, [DEFAULT_DENSITY] * 3, intra=intra, inter=inter
        )
        torch.testing.assert_close(merged, expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_is_half_out(dtype):
    tensors = _tensors(3, dtype=dtype)
    merged = merge_tensors(tensors, "pcb", base_index=0)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    as_float = merge_tensors([t.float() for t in tensors], "pcb", base_index=0)
    assert torch.equal(merged, as_float.to(dtype))


def test_only_the_base_gives_the_base():
    (base,) = _tensors(0)
    assert torch.equal(merge_tensors([base], "pcb", base_index=0), base)


def test_merge_state_dicts_in_memory():
    tensors = _tensors(2)
    states = [{"w": t, "step": torch.tensor(3)} for t in tensors]
    merged = merge_state_dicts(states, "pcb", base=0)
    assert torch.equal(merged["step"], torch.tensor(3))
    expected = reference_pcb(tensors[0], tensors[1:], [1.0, 1.0], [DEFAULT_DENSITY] * 2)
    torch.testing.assert_close(merged["w"], expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"density": 0.0}, r"'density' must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"'density' must be in \(0, 1\], got 1.5"),
        ({"density": [0.2, -0.1, 0.2]}, r"'density' must be in \(0, 1\], got -0.1"),
        ({"clamp_ratio": -0.01}, r"'clamp_ratio' must be finite and in \[0, 0.5\)"),
        ({"clamp_ratio": float("nan")}, r"'clamp_ratio' must be finite"),
        ({"clamp_ratio": float("inf")}, r"'clamp_ratio' must be finite"),
        ({"lambda": float("inf")}, r"'lambda' must be finite"),
        ({"weight": float("nan")}, r"'weight' must be finite"),
    ],
)
def test_bad_parameters_are_refused(parameters, message):
    with pytest.raises(ValueError, match=message):
        merge_tensors(_tensors(3), "pcb", base_index=0, parameters=parameters)


def test_missing_base_is_refused():
    with pytest.raises(ValueError, match="requires a base input"):
        merge_tensors(_tensors(2), "pcb")


@pytest.mark.parametrize("inter_balance", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2])
def test_non_finite_input_names_model_and_tensor(bad, where, inter_balance):
    tensors = _tensors(2)
    tensors[where][3, 4] = bad
    role = "base model" if where == 0 else "model"
    with pytest.raises(
        ValueError,
        match=rf"pcb: {role} {where} has NaN or Inf values in tensor "
        r"layers\.0\.weight",
    ):
        merge_tensors(
            tensors,
            "pcb",
            base_index=0,
            name="layers.0.weight",
            parameters={"inter_balance": inter_balance},
        )


def test_non_finite_base_with_no_finetune_is_refused():
    base = torch.zeros(3)
    base[1] = float("nan")
    with pytest.raises(ValueError, match="pcb: base model 0 has NaN or Inf values in tensor w"):
        merge_tensors([base], "pcb", base_index=0, name="w")


def test_registration_is_idempotent():
    first = merge_methods.get("pcb")
    assert register() is first
    import importlib

    importlib.reload(mergekit_pcb)
    assert merge_methods.get("pcb") is first


def test_a_foreign_pcb_is_kept_with_a_warning(monkeypatch, caplog):
    class ForeignPCB(PCBMerge.__mro__[1]):  # a GroupMergeMethod that is not ours
        spec = PCBMerge.spec

        def merge_group(self, group, /, **parameters):
            return group.base.tensor

    foreign = ForeignPCB()
    monkeypatch.setitem(mergekit_registry._METHODS, "pcb", foreign)
    with caplog.at_level(logging.WARNING):
        assert register() is foreign
    assert "already provides a merge method named 'pcb'" in caplog.text
    assert merge_methods.get("pcb") is foreign


def test_run_merge_end_to_end(tiny_models, tmp_path):
    config = write_config(
        str(tmp_path / "pcb.yml"),
        tiny_models,
        per_model={"code": {"weight": 1.4, "density": 0.3}},
        parameters={"lambda": 1.1, "clamp_ratio": 0.01},
    )
    with open(config, encoding="utf-8") as file:
        import yaml

        merge_config = MergeConfiguration.model_validate(yaml.safe_load(file))
    out = tmp_path / "merged"
    run_merge(merge_config, str(out), options=MergeOptions(quiet=True))

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    merged = load_file(out / "model.safetensors")
    states = {n: load_file(os.path.join(p, "model.safetensors")) for n, p in tiny_models.items()}
    names = ["math", "code", "chat"]
    weights = [1.0, 1.4, 1.0]
    densities = [0.2, 0.3, 0.2]
    for tensor_name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        expected = reference_pcb(
            states["base"][tensor_name],
            [states[n][tensor_name] for n in names],
            weights,
            densities,
            lam=1.1,
            clamp_ratio=0.01,
        )
        torch.testing.assert_close(merged[tensor_name], expected.float(), rtol=0, atol=1e-6)


# --- scope: model inside a mergekit merge (method_scope.py) ------------------------


def test_scope_model_needs_mergekit_loaded_models():
    tensors = [torch.zeros(4), torch.ones(4)]
    with pytest.raises(ValueError, match="scope: model needs models that mergekit loads"):
        merge_tensors(tensors, "pcb", base_index=0, parameters={"scope": "model"})


def test_mergekit_merge_with_scope_model_matches_spec(tiny_models, tmp_path):
    config_path = write_config(
        str(tmp_path / "pcb.yml"),
        tiny_models,
        per_model={"code": {"weight": 1.3, "density": 0.3}},
        parameters={"scope": "model", "lambda": 1.1, "clamp_ratio": 0.02},
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    merged = load_file(tmp_path / "out" / "model.safetensors")

    states = {n: load_file(os.path.join(p, "model.safetensors")) for n, p in tiny_models.items()}
    names = sorted(states["base"])
    flat = {n: torch.cat([s[k].reshape(-1) for k in names]) for n, s in states.items()}
    expected = reference_pcb(
        flat["base"],
        [flat["math"], flat["code"], flat["chat"]],
        [1.0, 1.3, 1.0],
        [0.2, 0.3, 0.2],
        lam=1.1,
        clamp_ratio=0.02,
    )
    got = torch.cat([merged[k].reshape(-1) for k in names])
    assert relative_error(got, expected, flat["base"]) <= 1e-5
    # and it differs from the per-tensor default, which the README documents
    per_tensor = config.model_copy(deep=True)
    per_tensor.parameters["scope"] = "tensor"
    run_merge(per_tensor, str(tmp_path / "per_tensor"), options=MergeOptions(quiet=True))
    other = load_file(tmp_path / "per_tensor" / "model.safetensors")
    assert any(not torch.equal(other[k], merged[k]) for k in names)


def test_scope_model_names_a_non_finite_tensor_anywhere(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["chat"], broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.1.self_attn.v_proj.weight"][0, 1] = float("inf")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    config_path = write_config(
        str(tmp_path / "pcb.yml"),
        {**tiny_models, "chat": str(broken)},
        parameters={"scope": "model"},
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    message = (
        f"pcb: model {broken} has NaN or Inf values in tensor "
        "model.layers.1.self_attn.v_proj.weight"
    )
    with pytest.raises(ValueError, match=message):
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))


def test_scope_model_progress_bars_have_their_total(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(model_stats, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    method_scope._cache.clear()  # computed here, not reused from another test's merge
    config_path = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, parameters={"scope": "model", "lambda": 0.9}
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    with safe_open(os.path.join(tiny_models["base"], "model.safetensors"), "pt") as file:
        stored = len(list(file.keys()))
    assert len(RecordingBar.made) == 4  # four passes
    assert [(bar.total, bar.n) for bar in RecordingBar.made] == [(stored, stored)] * 4




@CUDA
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_mergekit_merge_with_cuda_equals_the_cpu_merge(scope, tiny_models, tmp_path):
    # The failure: scope: model with --cuda stopped at a CPU histogram.
    config_path = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, parameters={"scope": scope, "clamp_ratio": 0.02}
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    merged = {}
    for cuda in (False, True):
        out = str(tmp_path / f"out-cuda-{cuda}")
        run_merge(config, out, options=MergeOptions(quiet=True, cuda=cuda))
        merged[cuda] = load_file(f"{out}/model.safetensors")
    base = load_file(f"{tiny_models['base']}/model.safetensors")
    names = sorted(merged[False])
    flat = {cuda: torch.cat([m[k].reshape(-1) for k in names]) for cuda, m in merged.items()}
    flat_base = torch.cat([base[k].reshape(-1) for k in names])
    assert relative_error(flat[True], flat[False].double(), flat_base) <= 1e-5
