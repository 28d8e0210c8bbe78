"""The merge of a population in memory equals mergekit's merge of it written to disk.

For every method the evolver is meant for, in float32 and bfloat16: a population with
one fine-tune replaced by an offspring is merged in memory into a live model, and the
same population, written as model folders, is merged by mergekit's ``run_merge``
in-process (``mergekit-yaml``'s own function) and read back. They must be equal bit
for bit (mergekit's own code computes both).
"""

from __future__ import annotations

import os

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mergekit_pcb  # noqa: F401  (registers pcb)
from mergekit_pcb.errors import ConfigError
from mergekit_pcb.evolve.offspring import OffspringKey
from mergekit_pcb.evolve.population import Population, write_model_folder
from mergekit_pcb.evolve.population_merge import PopulationMerge
from mergekit_pcb.synthetic import write_tiny_models

FINETUNES = ("math", "code", "chat")
SEED = 1234  # mergekit's --random-seed, for dare_ties and della


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory) -> dict[str, str]:
    """The tiny base and fine-tunes stored in bfloat16 (offspring then stay bf16)."""
    return write_tiny_models(str(tmp_path_factory.mktemp("bf16")), dtype=torch.bfloat16)


def _config(method: str, paths: dict[str, str], dtype: str, **parameters) -> MergeConfiguration:
    per_model: dict = {"weight": 1.0}
    if method not in ("linear", "task_arithmetic"):
        per_model["density"] = 0.4
    if method == "linear":  # no base: every model is an individual
        models = [
            {"model": paths[n], "parameters": {"weight": w}}
            for n, w in zip(FINETUNES, (0.5, 1.0, 1.5), strict=True)
        ]
        return MergeConfiguration.model_validate(
            {"merge_method": "linear", "models": models, "dtype": dtype}
        )
    models = [{"model": paths[n], "parameters": dict(per_model)} for n in FINETUNES]
    models[1]["parameters"]["weight"] = 0.7
    return MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": paths["base"],
            "models": models,
            "parameters": parameters,
            "dtype": dtype,
        }
    )


def _on_disk(population: Population, members, root: str, paths: dict[str, str]) -> dict[str, str]:
    """The population written as model folders: name -> folder (the base as it is)."""
    out = dict(paths)
    for index, name in enumerate(FINETUNES):
        folder = os.path.join(root, name)
        write_model_folder(members[index], folder, population.sources[index], quiet=True)
        out[name] = folder
    return out


def _mergekit(config: MergeConfiguration, out: str, options: MergeOptions) -> dict:
    run_merge(config, out, options)
    return load_file(os.path.join(out, "model.safetensors"))


def _live(paths: dict[str, str], dtype: str):
    return AutoModelForCausalLM.from_pretrained(paths["base"], dtype=getattr(torch, dtype))


def _assert_equal(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert expected.keys() <= state.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def _snapshot(population: Population) -> list[dict[str, torch.Tensor]]:
    return [
        {n: store.get(n, "cpu").clone() for n in store.names} for store in population.individuals
    ]


CASES = [
    ("pcb", {}),
    ("pcb", {"scope": "model"}),
    ("ties", {}),
    ("dare_ties", {}),
    ("della", {}),
    ("task_arithmetic", {"lambda": 0.9}),
    ("linear", {}),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("method", "parameters"),
    CASES,
    ids=["pcb", "pcb-scope-model", "ties", "dare_ties", "della", "task_arithmetic", "linear"],
)
def test_population_merge_equals_mergekit(tiny_models, tmp_path, method, parameters, dtype):
    options = MergeOptions(quiet=True, random_seed=SEED)
    config = _config(method, tiny_models, dtype, **parameters)
    population = Population.load(config, options)
    before = _snapshot(population)
    child = population.offspring(OffspringKey(seed=5, generation=0, individual=1, partner=2))
    members = population.members({1: child})
    paths = _on_disk(population, members, str(tmp_path / "population"), tiny_models)
    expected = _mergekit(
        _config(method, paths, dtype, **parameters), str(tmp_path / "merged"), options
    )

    model = _live(tiny_models, dtype)
    with PopulationMerge(config, options, floating=population.floating()) as merge:
        merge.write_fixed(model, population.base, members)
        merge.write_merge(model, population.base, members)
    _assert_equal(model, expected)
    # The merge read the population and left it as it was.
    assert all(
        torch.equal(store.get(n, "cpu"), before[i][n])
        for i, store in enumerate(population.individuals)
        for n in store.names
    )


@pytest.mark.parametrize("method", ["pcb", "dare_ties"])
def test_bf16_checkpoints(bf16_models, tmp_path, method):
    options = MergeOptions(quiet=True, random_seed=SEED)
    parameters = {"scope": "model"} if method == "pcb" else {}
    config = _config(method, bf16_models, "bfloat16", **parameters)
    population = Population.load(config, options)
    child = population.offspring(OffspringKey(seed=9, generation=3, individual=0, partner=2))
    assert all(child.info[n].dtype == torch.bfloat16 for n in child.names)
    members = population.members({0: child})
    paths = _on_disk(population, members, str(tmp_path / "population"), bf16_models)
    expected = _mergekit(
        _config(method, paths, "bfloat16", **parameters), str(tmp_path / "merged"), options
    )
    model = _live(bf16_models, "bfloat16")
    with PopulationMerge(config, options) as merge:
        merge.write_merge(model, population.base, members)
    _assert_equal(model, expected)


def test_each_candidate_is_merged_afresh_scope_model(tiny_models, tmp_path):
    """A, B, then A again: whole-model statistics follow the population merged."""
    options = MergeOptions(quiet=True)
    config = _config("pcb", tiny_models, "float32", scope="model")
    population = Population.load(config, options)
    model = _live(tiny_models, "float32")
    merged = []
    with PopulationMerge(config, options) as merge:
        for key in (OffspringKey(1, 0, 0, 1), OffspringKey(1, 0, 2, 0)):
            members = population.members({key.individual: population.offspring(key)})
            merge.write_merge(model, population.base, members)
            merged.append({k: v.clone() for k, v in model.state_dict().items()})
        merge.write_merge(model, population.base, population.members())
        original = {k: v.clone() for k, v in model.state_dict().items()}
        members = population.members({0: population.offspring(OffspringKey(1, 0, 0, 1))})
        merge.write_merge(model, population.base, members)
        again = model.state_dict()
    assert any(not torch.equal(merged[0][k], merged[1][k]) for k in again)
    assert all(torch.equal(merged[0][k], again[k]) for k in again)
    # The untouched population merges as mergekit merges the original checkpoints.
    expected = _mergekit(config, str(tmp_path / "original"), options)
    assert all(torch.equal(original[k], v) for k, v in expected.items())


def test_the_private_method_is_unregistered(tiny_models):
    from mergekit import merge_methods

    config = _config("pcb", tiny_models, "float32", scope="model")
    names = {m.spec.name for m in merge_methods.registered_methods()}
    with PopulationMerge(config) as merge:
        assert merge._private in {m.spec.name for m in merge_methods.registered_methods()}
    assert {m.spec.name for m in merge_methods.registered_methods()} == names


def test_tensors_that_do_not_vary_are_written_once(tiny_models, tmp_path):
    """With every individual tensor taken for a non-floating buffer, nothing varies and
    write_fixed writes the whole merge."""
    options = MergeOptions(quiet=True)
    config = _config("ties", tiny_models, "float32")
    population = Population.load(config, options)
    floating = dict.fromkeys(population.floating(), False)
    model = _live(tiny_models, "float32")
    with PopulationMerge(config, options, floating=floating) as merge:
        assert merge.varying == [] and len(merge.fixed) == len(merge.planned)
        merge.write_fixed(model, population.base, population.members())
    _assert_equal(model, _mergekit(config, str(tmp_path / "m"), options))


def test_refusals(tiny_models):
    options = MergeOptions(quiet=True)
    with pytest.raises(ConfigError, match=r"dare_ties draws random masks.*random seed"):
        PopulationMerge(_config("dare_ties", tiny_models, "float32"), options)
    tokenizer = _config("ties", tiny_models, "float32").model_copy(
        update={"tokenizer_source": "base"}
    )
    with pytest.raises(ConfigError, match="tokenizer_source"):
        PopulationMerge(tokenizer, options)
    slices = MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": tiny_models["base"],
            "slices": [
                {
                    "sources": [
                        {"model": tiny_models[n], "layer_range": [0, 2]}
                        for n in ("base", *FINETUNES)
                    ]
                }
            ],
            "parameters": {"weight": 1.0, "density": 0.5},
        }
    )
    with pytest.raises(ConfigError, match="slices and modules are not supported"):
        PopulationMerge(slices, options)
    single = _config("ties", tiny_models, "float32")
    single = single.model_copy(update={"models": single.models[:1]})
    with pytest.raises(ConfigError, match="at least two models besides the base"):
        PopulationMerge(single, options)
    with pytest.raises(ConfigError, match="truncate"):
        PopulationMerge(
            _config("ties", tiny_models, "float32"),
            MergeOptions(quiet=True, unsafe_truncate_embeddings=True),
        )


def test_mergekit_draws_the_same_masks_from_the_same_seed(tiny_models, tmp_path):
    """What the random methods' tests rest on: mergekit's own merge is reproducible from
    --random-seed (and only from it)."""
    config = _config("dare_ties", tiny_models, "float32")
    runs = [
        _mergekit(config, str(tmp_path / f"run{k}"), MergeOptions(quiet=True, random_seed=seed))
        for k, seed in enumerate((SEED, SEED, SEED + 1))
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
