"""Compact contributions: storage round trips, in-place candidates against mergekit's own
merges (every linear method, both pcb scopes, float32 and bf16), contributions on disk."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.merge import load_config, merge_into
from mergekit_pcb.tune.capture import capture_contributions
from mergekit_pcb.tune.compact import compact
from mergekit_pcb.tune.placement import Placement
from tests.conftest import write_config


@pytest.mark.parametrize(
    "pattern",
    ["empty", "first", "last", "long_gaps", "sparse", "half", "dense", "runs"],
)
def test_compact_round_trip_is_exact(pattern):
    gen = torch.Generator().manual_seed(1)
    d = 70_000
    x = torch.zeros(d)
    if pattern == "first":
        x[0] = 1.5
    elif pattern == "last":
        x[-1] = -2.0
    elif pattern == "long_gaps":  # gaps of 255, 256, 510, 511 and one of ~60k
        for p in (3, 258, 514, 1024, 1535, 62_000):
            x[p] = p / 7
    elif pattern in ("sparse", "half", "dense"):
        share = {"sparse": 0.01, "half": 0.5, "dense": 0.95}[pattern]
        x = torch.randn(d, generator=gen) * (torch.rand(d, generator=gen) < share)
    elif pattern == "runs":  # kept entries in contiguous blocks, as filters leave them
        x[100:2000] = torch.randn(1900, generator=gen)
        x[50_000:50_010] = 3.0
    row = compact(x)
    assert torch.equal(row.dense(), x)
    out = torch.full((d,), 0.25)
    row.add_to(out, -1.5)
    torch.testing.assert_close(out, 0.25 - 1.5 * x, rtol=0, atol=1e-6)
    # At most one filler per 255 skipped entries; never more than the dense row.
    assert row.nbytes <= min(4 * d, 5 * (int((x != 0).sum()) + d // 255 + 1))


def test_sparse_rows_cost_one_byte_of_position_and_dense_rows_none():
    x = torch.zeros(100_000)
    x[::5] = 1.0  # 20% kept, every gap 5
    assert compact(x).nbytes == 20_000 * (1 + 4)
    y = torch.arange(1.0, 100_001.0)  # nothing to gain: stored dense
    row = compact(y)
    assert row.gaps is None and row.nbytes == 4 * 100_000


def test_values_exact_in_the_merge_dtype_are_stored_in_it():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=gen).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(5000, generator=gen)).bfloat16()
    delta = (tuned - base).float()  # exact in bf16
    row = compact(delta, torch.bfloat16)
    assert row.values.dtype == torch.bfloat16 and torch.equal(row.dense(), delta)
    inexact = delta / 3
    row = compact(inexact, torch.bfloat16)
    assert row.values.dtype == torch.float32 and torch.equal(row.dense(), inexact)


# --- candidates against mergekit's merge of the same weights --------------------------


def _frozen_copy(source: str, base: str, dest: str, tensors: list[str]) -> str:
    """A copy of fine-tune ``source`` whose ``tensors`` are the base's (left unchanged)."""
    shutil.copytree(source, dest)
    path = os.path.join(dest, "model.safetensors")
    state, base_state = load_file(path), load_file(os.path.join(base, "model.safetensors"))
    for name in tensors:
        state[name] = base_state[name].clone()
    save_file(state, path, metadata={"format": "pt"})
    return dest


FROZEN = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny models, with the chat fine-tune leaving two tensors unchanged."""
    frozen = str(tmp_path_factory.mktemp("frozen") / "chat")
    return {
        **tiny_models,
        "chat": _frozen_copy(tiny_models["chat"], tiny_models["base"], frozen, FROZEN),
    }


def _config(path, models, method: str, dtype: str, density: float, **shared):
    per_model = {
        "math": {"weight": 1.0, "density": density},
        "code": {"weight": 1.0, "density": min(1.0, density * 1.5)},
        "chat": {"weight": 1.0, "density": density},
    }
    overrides = {"merge_method": method, "dtype": dtype, "per_model": per_model}
    if method == "linear":
        overrides["base_model"] = None
    if method != "pcb":
        for parameters in per_model.values():
            del parameters["density"]
    overrides["parameters"] = {"lambda": 1.1, **shared} if method != "linear" else shared
    return write_config(str(path), models, **overrides)


def _full_merge(config: str, out: str, weights) -> dict[str, torch.Tensor]:
    merge_config, source = load_config(config)
    for entry, weight in zip(merge_config.models, weights, strict=True):
        entry.parameters["weight"] = weight
    merge_into(merge_config, out, MergeOptions(quiet=True), config_source=source)
    return load_file(os.path.join(out, "model.safetensors"))


def _assert_same_merge(got: dict, expected: dict, dtype: str) -> None:
    assert expected.keys() <= got.keys()
    if dtype == "float32":
        for name, tensor in expected.items():
            assert (got[name].float() - tensor.float()).abs().max().item() <= 1e-6, name
        return
    total = equal = 0
    for name, tensor in expected.items():
        a, b = got[name].to(tensor.dtype), tensor
        same = a == b
        total += a.numel()
        equal += int(same.sum())
        # Elsewhere within one unit in the last place of the merge dtype.
        ulp = torch.finfo(b.dtype).eps * b.float().abs().clamp(min=torch.finfo(b.dtype).tiny)
        assert ((a.float() - b.float()).abs() <= ulp * 1.0001)[~same].all(), name
    assert equal >= 0.999 * total, (equal, total)


CASES = [
    ("pcb", "float32", 0.05, {}),
    ("pcb", "float32", 0.2, {}),
    ("pcb", "float32", 1.0, {}),
    pytest.param("pcb", "float32", 0.2, {"scope": "model"}, marks=pytest.mark.slow),
    pytest.param("pcb", "bfloat16", 0.2, {}, marks=pytest.mark.slow),
    pytest.param("pcb", "bfloat16", 0.1, {"scope": "model"}, marks=pytest.mark.slow),
    ("task_arithmetic", "float32", 1.0, {}),
    ("task_arithmetic", "bfloat16", 1.0, {}),
    ("task_arithmetic", "float32", 1.0, {"normalize": True}),
    ("linear", "float32", 1.0, {}),
    ("linear", "bfloat16", 1.0, {}),
    ("linear", "float32", 1.0, {"normalize": False}),
]


@pytest.mark.parametrize(("method", "dtype", "density", "shared"), CASES)
def test_candidate_equals_mergekit_merge(models, tmp_path, method, dtype, density, shared):
    config = _config(tmp_path / "c.yml", models, method, dtype, density, **shared)
    merge_config, _ = load_config(config)
    contributions = capture_contributions(merge_config)
    live = AutoModelForCausalLM.from_pretrained(models["base"], dtype=getattr(torch, dtype))
    contributions.load_fixed(live)
    n = len(contributions.model_names)
    for weights in ([1.0] * n, [0.6, 2.7, 1.3][:n], [-0.5, 1.2, 0.9][:n]):
        contributions.apply(live, weights)
        full = _full_merge(config, str(tmp_path / f"full-{weights[0]}"), weights)
        _assert_same_merge(live.state_dict(), full, dtype)


def test_pcb_contributions_are_compact_and_frozen_tensors_cost_nothing(models, tmp_path):
    config = _config(tmp_path / "c.yml", models, "pcb", "bfloat16", 0.2)
    contributions = capture_contributions(load_config(config)[0])
    # 0.2 kept (0.3 for code): about 0.2 x (1 byte of position + 4 of value)
    assert contributions.bytes_per_parameter_per_model <= 1.25
    chat = contributions.model_names.index(models["chat"])
    for name in FROZEN:
        assert chat not in contributions.terms[name].rows
    assert contributions.layout.start == [1.0, 1.0, 1.0]


def test_contributions_on_disk_or_over_budget_give_the_same_candidate(models, tmp_path):
    config = _config(tmp_path / "c.yml", models, "pcb", "float32", 0.2)
    merge_config, _ = load_config(config)
    in_memory = capture_contributions(merge_config)
    # A CPU budget that holds about half of them (with the base): the rest go to disk.
    budget = in_memory.stored_bytes // 2
    placement = Placement("auto", {"cpu": budget})
    mixed = capture_contributions(merge_config, placement=placement, cache_dir=str(tmp_path / "c"))
    assert {terms.on_disk for terms in mixed.terms.values()} == {True, False}
    assert 0 < placement.used["disk"] < in_memory.stored_bytes
    assert placement.used["cpu"] <= budget
    assert placement.used["cpu"] + placement.used["disk"] == in_memory.stored_bytes
    weights = [0.7, 1.9, 1.2]
    for name in in_memory.terms:
        torch.testing.assert_close(
            mixed.merged_tensor(name, weights),
            in_memory.merged_tensor(name, weights),
            rtol=0,
            atol=0,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_contributions_live_on_the_parameters_gpu(models, tmp_path):
    config = _config(tmp_path / "c.yml", models, "pcb", "bfloat16", 0.2)
    contributions = capture_contributions(
        load_config(config)[0],
        MergeOptions(quiet=True, device="cuda"),
        placement=Placement("device"),
    )
    for terms in contributions.terms.values():
        assert all(row.device.type == "cuda" for row in terms.rows.values())


def test_methods_that_are_not_linear_are_refused(models, tmp_path):
    config = write_config(str(tmp_path / "ties.yml"), models, merge_method="ties")
    with pytest.raises(
        ConfigError,
        match=r"merge_method: ties is not one \(use one of: pcb, task_arithmetic, linear\)",
    ):
        capture_contributions(load_config(config)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_base_added_by_chunks_equals_one_float32_add(dtype):
    """The CPU add of the base converts chunk by chunk; the sum must be the plain one.

    The private helper is the point: its chunks (two whole ones and a partial one) are
    what could go wrong, and no tiny model's tensor is large enough to reach them.
    """
    from mergekit_pcb.tune.contributions import _CONVERT_CHUNK, _add_converted

    gen = torch.Generator().manual_seed(0)
    numel = 2 * _CONVERT_CHUNK + 12_345  # two whole chunks and a partial one
    out = torch.randn(numel, generator=gen)
    other = torch.randn(numel, generator=gen).to(dtype)
    expected = out + other.float()
    _add_converted(out, other)
    assert torch.equal(out, expected)
