"""``weight_layout.py``: the config's weight settings as searched numbers.

Each tensor's weights from the layout are checked against the weights mergekit's
planner resolves for the same numbers, and the tuner's candidates against mergekit's
merges of the config written with them (``pcb`` in both scopes, ``task_arithmetic``,
``linear``), on tiny models with five layers so that gradients fall between points.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import yaml
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.merge import merge_into, read_config
from mergekit_pcb.synthetic import tiny_llama_config, write_tiny_models
from mergekit_pcb.tune.capture import capture_contributions, plan_weights
from mergekit_pcb.tune.weight_layout import (
    WeightLayout,
    expand_setting,
    layout_for,
    setting_leaves,
)

LAYERS = 5
OPTIONS = MergeOptions(quiet=True)


@pytest.fixture(scope="module")
def five_layer_models(tmp_path_factory) -> dict[str, str]:
    folder = str(tmp_path_factory.mktemp("five-layers"))
    config = tiny_llama_config(num_hidden_layers=LAYERS)
    return write_tiny_models(folder, ("math", "code"), config=config)


def _raw(models: dict[str, str], method: str, settings: list, **extra) -> dict:
    names = [n for n in models if n != "base"]
    entries = [
        {"model": models[n], "parameters": {"weight": s}}
        for n, s in zip(names, settings, strict=True)
    ]
    if method == "linear":
        raw = {"merge_method": "linear", "models": entries}
    else:
        raw = {"merge_method": method, "base_model": models["base"], "models": entries}
        if method == "pcb":
            for entry in entries:
                entry["parameters"]["density"] = 0.3
    return {**raw, "dtype": "float32", **extra}


GRADIENT = [0.5, 1.5, 1.0]  # 3 points over 5 layers: layers 1 and 3 fall between points
FILTERS = [
    {"filter": "self_attn", "value": [0.4, 1.2]},
    {"filter": "up_proj", "value": 2.0},
    {"filter": "mlp", "value": [0.7, 1.6, 0.9]},
    {"value": 1.1},
]


def _names(raw: dict) -> list[str]:
    base = raw.get("base_model") if raw["merge_method"] != "linear" else None
    return [str(e["model"]) for e in raw["models"] if e["model"] != base]


def test_leaves_labels_and_write_back():
    layout = WeightLayout([GRADIENT, FILTERS, 0.9, {"filter": "mlp", "value": 2}], list("abcd"))
    assert layout.start == [0.5, 1.5, 1.0, 0.4, 1.2, 2.0, 0.7, 1.6, 0.9, 1.1, 0.9, 2.0]
    assert layout.labels[0] == "a: weight point 1 of 3"
    assert layout.labels[4] == "b: weight filter self_attn point 2 of 2"
    assert layout.labels[5] == "b: weight filter up_proj"
    assert layout.labels[9] == "b: weight filter *"
    assert layout.labels[10] == "c"
    assert layout.labels[11] == "d: weight filter mlp"
    numbers = [float(k) for k in range(layout.size)]
    a, b, c, d = layout.settings_with(numbers)
    assert a == [0.0, 1.0, 2.0] and c == 10.0 and d == {"filter": "mlp", "value": 11.0}
    assert b[0] == {"filter": "self_attn", "value": [3.0, 4.0]}
    assert b[2]["value"] == [6.0, 7.0, 8.0] and b[3] == {"value": 9.0}
    assert WeightLayout(layout.settings_with(numbers), list("abcd")).start == numbers


def test_expand_setting():
    assert expand_setting(0.8, 3, ()) == [0.8, 0.8, 0.8]
    assert expand_setting(0.8, None, ["self_attn", "mlp"]) == [
        {"filter": "self_attn", "value": 0.8},
        {"filter": "mlp", "value": 0.8},
        {"value": 0.8},
    ]
    assert expand_setting(2, 2, ["mlp"]) == [
        {"filter": "mlp", "value": [2.0, 2.0]},
        {"value": [2.0, 2.0]},
    ]
    assert expand_setting(GRADIENT, 4, ["mlp"]) == GRADIENT  # the config's own structure stays


NESTED = [{"filter": "mlp", "value": [{"filter": "up", "value": 1.0}]}]


@pytest.mark.parametrize("bad", ["many", True, [], [1.0, "x"], [{"filter": "mlp"}], None, NESTED])
def test_non_numeric_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="models\\[x\\]: weight"):
        setting_leaves(bad, "models[x]: weight")


def test_numeric_strings_count_as_numbers():
    # YAML reads 1e-1 as a string; mergekit reads it as a number, and so does the tuner.
    assert WeightLayout(["1e-1"], ["a"]).start == [0.1]


@pytest.mark.parametrize(
    "settings",
    [
        [GRADIENT, 1.3],
        [FILTERS, GRADIENT],
        # a filter list without a rest entry: the tensors it misses take the default
        [[{"filter": "mlp", "value": [0.2, 0.9, 1.4, 0.6]}], 0.8],
    ],
    ids=["gradient", "filters", "no-rest-entry"],
)
def test_tensor_weights_equal_mergekit_resolved(five_layer_models, settings):
    raw = _raw(five_layer_models, "pcb", settings)
    names = _names(raw)
    layout = layout_for(raw, names).resolved(raw, lambda r: plan_weights(r, OPTIONS))
    rng = random.Random(0)
    for _ in range(3):
        numbers = [rng.uniform(-1, 3) for _ in range(layout.size)]
        resolved = plan_weights(layout.config_with(raw, numbers), OPTIONS)
        assert len(resolved) == 3 + 9 * LAYERS  # embeddings, norm, lm_head and the layers
        for tensor, by_model in resolved.items():
            expected = [by_model[n] for n in names]
            assert layout.tensor_weights(tensor, numbers) == expected, tensor


def test_positions_follow_mergekits_rule(five_layer_models):
    """A hand-computed check of the rule the module states: layer l of 5 at t = l/4,
    the tensors outside the layers at t = 0, 3 points read at s = 2t."""
    raw = _raw(five_layer_models, "pcb", [[1.0, 2.0, 4.0], 1.0])
    layout = layout_for(raw, _names(raw)).resolved(raw, lambda r: plan_weights(r, OPTIONS))
    start = layout.start

    def first(tensor: str) -> float:
        return layout.tensor_weights(tensor, start)[0]

    assert first("model.embed_tokens.weight") == 1.0
    assert first("lm_head.weight") == 1.0
    assert first("model.norm.weight") == 1.0
    expected = [1.0, 1.5, 2.0, 3.0, 4.0]  # s = 0, 0.5, 1, 1.5, 2
    for layer, value in enumerate(expected):
        assert first(f"model.layers.{layer}.mlp.down_proj.weight") == value


def test_layer_points_and_module_groups_expand_plain_weights(five_layer_models):
    raw = _raw(five_layer_models, "pcb", [0.5, [1.0, 2.0]])
    layout = layout_for(raw, _names(raw), layer_points=LAYERS, module_groups=["self_attn"])
    # the first model's plain weight: a 5-point gradient per group (self_attn, rest);
    # the second's gradient stays as written
    assert layout.start == [0.5] * 10 + [1.0, 2.0]
    assert layout.labels[5] == f"{_names(raw)[0]}: weight filter * point 1 of 5"


def _merge(raw: dict, out: str) -> dict[str, torch.Tensor]:
    path = out + ".yml"
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(raw, file)
    loaded = read_config(path)
    merge_into(loaded.merge_config, out, OPTIONS, config_source=loaded.source)
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize(
    "method, extra",
    [
        ("pcb", {}),
        ("pcb", {"parameters": {"scope": "model"}}),
        ("task_arithmetic", {}),
        ("linear", {}),
    ],
    ids=["pcb", "pcb-model-scope", "task_arithmetic", "linear"],
)
def test_candidates_equal_mergekit_merges(five_layer_models, tmp_path, method, extra):
    raw = _raw(five_layer_models, method, [FILTERS, GRADIENT], **extra)
    if method == "linear":
        raw["models"].insert(0, {"model": five_layer_models["base"], "parameters": {"weight": 0.3}})
    names = _names(raw)
    layout = layout_for(raw, names).resolved(raw, lambda r: plan_weights(r, OPTIONS))
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(raw))
    contributions = capture_contributions(read_config(str(config_path)).merge_config, layout=layout)
    model = AutoModelForCausalLM.from_pretrained(
        five_layer_models["base"], dtype=torch.float32
    )
    contributions.load_fixed(model)
    state = model.state_dict()
    rng = random.Random(1)
    for trial in range(2):
        numbers = [rng.uniform(0.2, 2.5) for _ in range(layout.size)]
        contributions.apply(model, numbers)
        merged = _merge(layout.config_with(raw, numbers), str(tmp_path / f"merged-{trial}"))
        assert merged.keys() <= state.keys()
        for name, tensor in merged.items():
            assert (state[name] - tensor).abs().max().item() <= 1e-6, name


def test_capture_refuses_a_layout_mergekit_disagrees_with(five_layer_models, tmp_path):
    raw = _raw(five_layer_models, "task_arithmetic", [GRADIENT, 1.0])
    names = _names(raw)
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(raw))
    wrong = WeightLayout([[0.5, 1.0, 1.5], 1.0], names)  # not the config's gradient
    wrong = wrong.resolved(raw, lambda r: plan_weights(r, OPTIONS))
    with pytest.raises(RuntimeError, match="mergekit resolves the weight of"):
        capture_contributions(read_config(str(config_path)).merge_config, layout=wrong)
