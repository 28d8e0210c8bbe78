"""Whole-model scope: exact streamed statistics against the spec on concatenated tensors."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_pcb.core import PCBOptions, pcb_merge
from mergekit_pcb.whole_model import RadixSelect, whole_model_stats
from tests.conftest import write_config
from tests.reference_pcb import reference_pcb, relative_error


def test_radix_select_is_exact():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(50_000, generator=gen),
            torch.tensor([0.0, -0.0, 0.0, 3.0, 3.0, -7.5, float(torch.finfo(torch.float32).tiny)]),
            torch.randn(1000, generator=gen).round(),  # many ties
        ]
    )
    chunks = values.split(7777)
    select = RadixSelect()
    for chunk in chunks:
        select.add_high(chunk)
    ranks = [0, 1, 500, 25_000, 50_003, len(values) - 2, len(values) - 1]
    select.finish_high(ranks)
    for chunk in chunks:
        select.add_low(chunk)
    expected = torch.sort(values).values
    assert select.values() == [expected[r].item() for r in ranks]
    with pytest.raises(ValueError, match="out of range"):
        RadixSelect().finish_high([0])


def _model(seed: int, n: int, shapes):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    finetuned = [[b + 0.02 * torch.randn(b.shape, generator=gen) for b in base] for _ in range(n)]
    return base, finetuned


def _whole_model_merge(base, finetuned, weights, densities, lam, options):
    n = len(finetuned)

    def stream():
        for k, b in enumerate(base):
            yield str(k), b, [finetuned[i][k] for i in range(n)]

    stats = whole_model_stats(stream, densities, options, progress=False)
    return [
        pcb_merge(
            b,
            [finetuned[i][k] for i in range(n)],
            weights=weights,
            densities=densities,
            lam=lam,
            options=options,
            stats=stats,
        )
        for k, b in enumerate(base)
    ]


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("clamp_ratio", [0.0, 0.01, 0.1])
def test_whole_model_matches_spec_on_concatenation(density, clamp_ratio):
    shapes = [(40, 30), (17,), (1,), (64, 9), (3, 3)]
    base, finetuned = _model(int(density * 100 + clamp_ratio * 1000), 3, shapes)
    finetuned[1][2] = base[2].clone()  # one model leaves one tensor unchanged
    weights, densities = [1.3, 0.7, 1.1], [density, min(1.0, density * 1.5), density]
    options = PCBOptions(clamp_ratio=clamp_ratio)
    merged = torch.cat(
        [
            m.reshape(-1)
            for m in _whole_model_merge(base, finetuned, weights, densities, 1.2, options)
        ]
    )
    flat_base = torch.cat([b.reshape(-1) for b in base])
    flat = [torch.cat([t.reshape(-1) for t in ft]) for ft in finetuned]
    expected = reference_pcb(flat_base, flat, weights, densities, 1.2, clamp_ratio)
    assert relative_error(merged, expected, flat_base) <= 1e-5


def test_single_tensor_model_gives_the_per_tensor_result_exactly():
    base, finetuned = _model(4, 3, [(50, 40)])
    for options in (PCBOptions(), PCBOptions(clamp_ratio=0.0, inter_balance=False)):
        (whole,) = _whole_model_merge(
            base, finetuned, [1.0, 1.5, 0.5], [0.2, 0.1, 0.3], 1.0, options
        )
        per_tensor = pcb_merge(
            base[0],
            [f[0] for f in finetuned],
            weights=[1.0, 1.5, 0.5],
            densities=[0.2, 0.1, 0.3],
            options=options,
        )
        assert torch.equal(whole, per_tensor)


def test_all_zero_model_takes_no_part():
    base, finetuned = _model(8, 2, [(20, 10), (5,)])
    frozen = [b.clone() for b in base]
    options = PCBOptions(intra_balance=False)  # intra depends on n
    without = _whole_model_merge(base, finetuned, [1.0, 1.0], [0.3, 0.3], 1.0, options)
    with_frozen = _whole_model_merge(base, [*finetuned, frozen], [1.0] * 3, [0.3] * 3, 1.0, options)
    for a, b in zip(without, with_frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


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
    import shutil

    from safetensors.torch import save_file

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


class _Bar:
    """Stands in for tqdm: records each bar's total and how far it went."""

    made: list[_Bar] = []  # noqa: RUF012  (test double)

    def __init__(self, iterable=None, total=None, **kwargs):
        self.iterable, self.total, self.n = iterable, total, 0
        _Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            self.n += 1
            yield item


def test_scope_model_progress_bars_have_their_total(tiny_models, tmp_path, monkeypatch):
    from safetensors import safe_open

    import mergekit_pcb.whole_model as whole_model

    monkeypatch.setattr(whole_model, "tqdm", _Bar)
    _Bar.made.clear()
    config_path = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, parameters={"scope": "model", "lambda": 0.9}
    )
    with open(config_path, encoding="utf-8") as file:
        config = MergeConfiguration.model_validate(yaml.safe_load(file))
    run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    with safe_open(os.path.join(tiny_models["base"], "model.safetensors"), "pt") as file:
        stored = len(list(file.keys()))
    assert len(_Bar.made) == 4  # four passes
    assert [(bar.total, bar.n) for bar in _Bar.made] == [(stored, stored)] * 4


def test_tensors_that_are_not_floating_point_are_passed_over():
    base, finetuned = _model(3, 2, [(30, 20)])
    counter = torch.tensor([7])  # an integer buffer, e.g. a step count

    def stream():
        yield "w", base[0], [f[0] for f in finetuned]
        yield "step", counter, [counter, counter]

    with_buffer = whole_model_stats(stream, [0.2, 0.3], PCBOptions(), progress=False, n_tensors=2)

    def floats_only():
        yield "w", base[0], [f[0] for f in finetuned]

    assert with_buffer == whole_model_stats(floats_only, [0.2, 0.3], PCBOptions(), progress=False)
