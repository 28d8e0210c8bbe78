"""The population's storage: placement, offspring stored or regenerated, acceptance,
individuals written as model folders."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.evolve.offspring import OffspringKey
from mergekit_pcb.evolve.population import Population, write_model_folder
from mergekit_pcb.evolve.population_merge import PopulationMerge
from mergekit_pcb.tune.placement import Placement

FINETUNES = ("math", "code", "chat")


def _config(paths: dict[str, str], method: str = "ties") -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": paths["base"],
            "models": [
                {"model": paths[n], "parameters": {"weight": 1.0, "density": 0.4}}
                for n in FINETUNES
            ],
            "dtype": "float32",
        }
    )


def _checkpoint(paths: dict[str, str], name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(paths[name], "model.safetensors"))


def _tensors(store) -> dict[str, torch.Tensor]:
    return {n: store.get(n, "cpu").clone() for n in store.names}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _expected_offspring(paths, key: OffspringKey) -> dict[str, torch.Tensor]:
    """The offspring from the checkpoints themselves, tensor by tensor."""
    parent = _checkpoint(paths, FINETUNES[key.individual])
    partner = _checkpoint(paths, FINETUNES[key.partner])
    return {n: key.tensor(n, parent[n], partner[n]) for n in parent}


def test_loads_the_checkpoints_and_says_where_they_live(tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="mergekit_pcb.evolve.population")
    population = Population.load(_config(tiny_models), placement=Placement(mode="cpu"))
    assert population.names == [tiny_models[n] for n in FINETUNES]
    for index, name in enumerate(FINETUNES):
        assert _equal(_tensors(population.individuals[index]), _checkpoint(tiny_models, name))
    assert _equal(_tensors(population.base), _checkpoint(tiny_models, "base"))
    nbytes = sum(t.numel() * t.element_size() for t in _checkpoint(tiny_models, "math").values())
    assert population.individuals[0].nbytes == nbytes
    assert population.spare_device == torch.device("cpu")
    log = caplog.text
    assert f"individual {tiny_models['math']}: {nbytes / 2**30:.2f} GiB, cpu" in log
    assert "offspring: stored while judged" in log
    assert "math" in population.describe() and "cpu" in population.describe()


def test_stored_offspring_and_acceptance(tiny_models):
    population = Population.load(_config(tiny_models))
    key = OffspringKey(3, 1, 0, 2)
    child = population.offspring(key)
    expected = _expected_offspring(tiny_models, key)
    assert _equal(_tensors(child), expected)
    population.accept(key, child)
    assert _equal(_tensors(population.individuals[0]), expected)
    # The next offspring goes into the spare, not over the accepted individual.
    other = OffspringKey(3, 1, 1, 0)
    population.offspring(other)
    assert _equal(_tensors(population.individuals[0]), expected)
    assert _equal(_tensors(population.individuals[1]), _checkpoint(tiny_models, "code"))
    # A later offspring of the changed individual starts from its new tensors.
    third = OffspringKey(3, 2, 2, 0)
    grandchild = population.offspring(third)
    chat = _checkpoint(tiny_models, "chat")
    assert _equal(_tensors(grandchild), {n: third.tensor(n, chat[n], expected[n]) for n in chat})


def _tight_placement(tiny_models) -> Placement:
    """CPU memory for the base and the three individuals, none for a spare."""
    nbytes = sum(t.numel() * t.element_size() for t in _checkpoint(tiny_models, "base").values())
    return Placement(mode="auto", budgets={"cpu": 4 * nbytes})


def test_offspring_regenerated_when_no_memory_is_left(tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="mergekit_pcb.evolve.population")
    population = Population.load(_config(tiny_models), placement=_tight_placement(tiny_models))
    assert population.spare_device is None
    assert "offspring: regenerated where read" in caplog.text
    key = OffspringKey(8, 0, 2, 1)
    child = population.offspring(key)
    assert child.where == "regenerated"
    expected = _expected_offspring(tiny_models, key)
    assert _equal(_tensors(child), expected)
    population.accept(key, child)  # written over the parent in place
    assert population.individuals[2].where == "cpu"
    assert _equal(_tensors(population.individuals[2]), expected)


def test_individuals_on_disk(tiny_models, tmp_path):
    cache = str(tmp_path / "cache")
    population = Population.load(
        _config(tiny_models), placement=Placement(mode="disk"), cache_dir=cache
    )
    assert all(s.where == "disk" for s in [population.base, *population.individuals])
    assert population.spare_device is None
    in_memory = Population.load(_config(tiny_models))
    key = OffspringKey(4, 0, 1, 0)
    child = population.offspring(key)
    assert _equal(_tensors(child), _tensors(in_memory.offspring(key)))
    population.accept(key, child)
    written = population.individuals[1]
    assert written.where == "disk" and written.folder.startswith(cache)
    assert _equal(_tensors(written), _expected_offspring(tiny_models, key))
    # The original checkpoint is read, never written.
    assert _equal(_tensors(population.individuals[0]), _checkpoint(tiny_models, "math"))
    # A second acceptance replaces the written folder and removes the first one.
    again = OffspringKey(4, 1, 1, 2)
    population.accept(again, population.offspring(again))
    assert not os.path.exists(written.folder)
    population.close()


def test_merge_reads_any_placement_alike(tiny_models, tmp_path):
    options = MergeOptions(quiet=True)
    config = _config(tiny_models, "pcb")
    merged = []
    for placement, cache in (
        (None, None),
        (Placement(mode="disk"), str(tmp_path / "cache")),
        (_tight_placement(tiny_models), None),
    ):
        population = Population.load(config, options, placement=placement, cache_dir=cache)
        key = OffspringKey(2, 0, 0, 1)
        members = population.members({0: population.offspring(key)})
        with PopulationMerge(config, options) as merge:
            merged.append(dict(merge.merged_tensors(population.base, members)))
    assert _equal(merged[0], merged[1]) and _equal(merged[0], merged[2])


def test_write_individual_is_a_model_folder(tiny_models, tmp_path):
    population = Population.load(_config(tiny_models))
    key = OffspringKey(6, 0, 1, 2)
    population.accept(key, population.offspring(key))
    folder = str(tmp_path / "code")
    population.write_individual(1, folder)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = _expected_offspring(tiny_models, key)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in expected.items())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("1+1=2")["input_ids"]).endswith("1+1=2")
    # Rewriting it replaces it whole; leaves nothing beside it.
    population.write_individual(1, folder)
    assert sorted(os.listdir(tmp_path)) == ["code"]


def test_sharded_model_folder(tiny_models, tmp_path):
    population = Population.load(_config(tiny_models))
    store = population.individuals[0]
    folder = str(tmp_path / "sharded")
    write_model_folder(store, folder, population.sources[0], shard_bytes=200_000, quiet=True)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in _checkpoint(tiny_models, "math").items())


def test_individuals_that_cannot_be_crossed_are_refused(tiny_models, tmp_path):
    import shutil

    odd = str(tmp_path / "odd")
    shutil.copytree(tiny_models["chat"], odd)
    state = load_file(os.path.join(odd, "model.safetensors"))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, os.path.join(odd, "model.safetensors"), metadata={"format": "pt"})
    paths = {**tiny_models, "chat": odd}
    with pytest.raises(ConfigError, match=r"model\.norm\.weight has shape \(64,\).*\(3,\)"):
        Population.load(_config(paths))
    with pytest.raises(ConfigError, match="does not fit in memory and no cache folder"):
        Population.load(_config(tiny_models), placement=Placement(mode="disk"))


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_an_individual_with_nan_or_inf_is_refused(tiny_models, tmp_path, mode):
    from mergekit_pcb.errors import MergeInputError
    from tests.conftest import broken_copy

    tensor = "model.layers.1.mlp.up_proj.weight"
    bad = broken_copy(tiny_models["code"], str(tmp_path / "bad"), tensor, float("inf"))
    with pytest.raises(
        MergeInputError, match=rf"model {bad} has NaN or Inf values in tensor {tensor}"
    ):
        Population.load(
            _config({**tiny_models, "code": bad}),
            placement=Placement(mode=mode),
            cache_dir=str(tmp_path / "cache"),
        )


def test_a_run_is_rebuilt_from_its_history(tiny_models):
    """What a resumed run does: the same told scores ask for the same candidates, and the
    accepted offspring, made again from their keys in order, give the same population."""
    from mergekit_pcb.evolve.evolver import Evolution, drive

    config = _config(tiny_models)
    population = Population.load(config)
    target = _checkpoint(tiny_models, "base")["model.norm.weight"] + 0.01
    made = {}

    def score(candidate) -> float:
        replaced = {}
        if candidate.key is not None:
            made[candidate.index] = population.offspring(candidate.key)
            replaced = {candidate.individual: made[candidate.index]}
        members = population.members(replaced)
        mean = sum(m.get("model.norm.weight", "cpu") for m in members) / len(members)
        return float((mean - target).pow(2).sum())

    def accept(candidate) -> None:
        population.accept(candidate.key, made[candidate.index])

    history = drive(Evolution(3, generations=3, seed=4, maximize=False), score, accept)
    assert any(j.accepted for j in history)

    rebuilt = Population.load(config)
    replay = Evolution(3, generations=3, seed=4, maximize=False)
    for judgement in history:
        candidate = replay.ask()
        assert candidate == judgement.candidate
        if replay.tell(candidate, judgement.score).accepted:
            rebuilt.accept(candidate.key, rebuilt.offspring(candidate.key))
    assert replay.ask() is None
    for old, new in zip(population.individuals, rebuilt.individuals, strict=True):
        assert _equal(_tensors(old), _tensors(new))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["population", "population_merge", "evolver", "offspring"])
def test_importing_an_evolve_module_first_keeps_pcb_registered(module):
    """The start-up hook registers pcb when mergekit's merge methods are first imported;
    an evolve module imported first in a fresh interpreter must not break that."""
    import subprocess
    import sys

    probe = (
        f"import mergekit_pcb.evolve.{module}\n"
        "import mergekit.merge_methods as m\n"
        "print('pcb' in [x.spec.name for x in m.registered_methods()])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True", out.stderr[-2000:]
