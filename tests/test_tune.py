"""``tune()`` (``job.py``), a whole tuning job on the tiny models: candidates equal to
mergekit's merges, recovery of known weights, resume after Ctrl-C, refusal of another run."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_pcb.merge import load_config, merge_into
from mergekit_pcb.tune import objectives
from mergekit_pcb.tune.capture import capture_contributions, plan_weights
from mergekit_pcb.tune.job import tune
from mergekit_pcb.tune.run_dir import RunMismatchError
from mergekit_pcb.tune.search import SearchSettings
from mergekit_pcb.tune.weight_layout import layout_for
from tests.conftest import write_config

TARGET = [1.6, 0.8, 2.2]


def _merge_to_disk(config_path: str, out: str, weights=None) -> dict[str, torch.Tensor]:
    merge_config, source = load_config(config_path)
    if weights is not None:
        for entry, w in zip(merge_config.models, weights, strict=True):
            entry.parameters["weight"] = w
    merge_into(merge_config, out, MergeOptions(quiet=True), config_source=source)
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def target_state(tune_config, tmp_path_factory) -> dict[str, torch.Tensor]:
    """A full mergekit pcb merge with known weights TARGET."""
    return _merge_to_disk(tune_config, str(tmp_path_factory.mktemp("target") / "m"), TARGET)


def _distance_objective(target: dict[str, torch.Tensor]) -> objectives.UserObjective:
    def distance(model, tokenizer) -> float:
        state = model.state_dict()
        return sum(float((state[k].float() - v.float()).pow(2).sum()) for k, v in target.items())

    return objectives.UserObjective(distance, maximize=False, name="distance to target")


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_candidate_equals_full_pcb_merge(tune_config, tiny_models, tmp_path, cache):
    merge_config, _ = load_config(tune_config)
    contributions = capture_contributions(
        merge_config, cache_dir=str(tmp_path / "cache") if cache == "disk" else None
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    contributions.load_fixed(model)
    state = model.state_dict()
    for weights in ([1.0, 1.0, 1.0], [0.6, 2.7, 1.3]):
        contributions.apply(model, weights)
        full = _merge_to_disk(tune_config, str(tmp_path / f"full-{weights[1]}"), weights)
        assert full.keys() <= state.keys()
        for name, tensor in full.items():
            assert (state[name] - tensor).abs().max().item() <= 1e-6, name


def _settings(**kw) -> SearchSettings:
    return SearchSettings(**{"budget": 300, "popsize": 8, "sigma0": 0.5, "seed": 3, **kw})


def _run(tune_config, out_dir, objective, settings, **kw):
    identity = {"kind": "test", "name": objective.name}
    return tune(
        tune_config,
        str(out_dir),
        objective,
        settings,
        identity_objective=identity,
        quiet=True,
        **kw,
    )


@pytest.mark.slow
def test_recovers_known_coefficients_deterministically(tune_config, target_state, tmp_path):
    objective = _distance_objective(target_state)
    first = _run(tune_config, tmp_path / "a", objective, _settings())
    assert first.start.weights == [1.0, 1.0, 1.0]
    assert first.best.score < 1e-3 * first.start.score
    for found, expected in zip(first.best.weights, TARGET, strict=True):
        assert abs(found - expected) <= 0.05
    second = _run(tune_config, tmp_path / "b", objective, _settings())
    assert [e.weights for e in second.history] == [e.weights for e in first.history]
    assert [e.score for e in second.history] == [e.score for e in first.history]

    # best.yml through mergekit reproduces the tuned model
    best = yaml.safe_load((tmp_path / "a" / "best.yml").read_text())
    weights = [m["parameters"]["weight"] for m in best["models"]]
    assert weights == first.best.weights
    merged = _merge_to_disk(str(tmp_path / "a" / "best.yml"), str(tmp_path / "best-merge"))
    model = AutoModelForCausalLM.from_pretrained(config_base(tune_config), dtype=torch.float32)
    merge_config, _ = load_config(tune_config)
    contributions = capture_contributions(merge_config)
    contributions.load_fixed(model)
    contributions.apply(model, weights)
    state = model.state_dict()
    for name, tensor in merged.items():
        assert (state[name] - tensor).abs().max().item() <= 1e-6, name
    history = [json.loads(line) for line in (tmp_path / "a" / "history.jsonl").open()]
    assert len(history) == len(first.history) <= 300
    assert (tmp_path / "a" / "scores.png").stat().st_size > 1000


def config_base(tune_config: str) -> str:
    return yaml.safe_load(open(tune_config, encoding="utf-8"))["base_model"]


class _Interrupt:
    """Wraps an objective; raises KeyboardInterrupt at call number ``stop_at``."""

    def __init__(self, objective, stop_at: int | None):
        self.objective, self.stop_at, self.calls = objective, stop_at, 0
        self.maximize, self.name = objective.maximize, objective.name

    def __call__(self, model, tokenizer):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.objective(model, tokenizer)


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_history(tune_config, target_state, tmp_path):
    settings = _settings(budget=40, popsize=6)
    straight = _run(tune_config, tmp_path / "straight", _distance_objective(target_state), settings)

    interrupted = _Interrupt(_distance_objective(target_state), stop_at=17)
    with pytest.raises(KeyboardInterrupt):
        _run(tune_config, tmp_path / "resumed", interrupted, settings)
    assert len((tmp_path / "resumed" / "history.jsonl").read_text().splitlines()) == 16

    again = _Interrupt(_distance_objective(target_state), stop_at=None)
    resumed = _run(tune_config, tmp_path / "resumed", again, settings)
    assert again.calls == len(straight.history) - 16  # nothing evaluated twice
    assert [e.weights for e in resumed.history] == [e.weights for e in straight.history]
    assert [e.score for e in resumed.history] == [e.score for e in straight.history]


def test_a_different_run_in_the_same_directory_is_refused(
    tune_config, tiny_models, target_state, tmp_path
):
    objective = _distance_objective(target_state)
    _run(tune_config, tmp_path / "run", objective, _settings(budget=10, popsize=4))
    other = write_config(str(tmp_path / "other.yml"), tiny_models, parameters={"lambda": 0.5})
    with pytest.raises(RunMismatchError, match=r"holds a different tuning run .*config_sha256"):
        _run(other, tmp_path / "run", objective, _settings(budget=10, popsize=4))
    with pytest.raises(RunMismatchError, match="differs in: settings"):
        _run(tune_config, tmp_path / "run", objective, _settings(budget=10, popsize=4, seed=9))


def test_structured_search_keeps_the_structure_and_best_yml_reproduces_it(
    tune_config, target_state, tmp_path
):
    """--layer-points and --module-groups: the search runs over every number of the
    expanded settings, best.yml holds them in that structure, and mergekit's merge of
    best.yml is the tuner's best candidate."""
    objective = _distance_objective(target_state)
    settings = _settings(budget=40, popsize=6)
    space = {"layer_points": 2, "module_groups": ["self_attn"]}
    result = _run(tune_config, tmp_path / "run", objective, settings, **space)
    assert len(result.start.weights) == 3 * 2 * 2  # models x groups (self_attn, rest) x points
    assert result.best.score < result.start.score
    best = yaml.safe_load((tmp_path / "run" / "best.yml").read_text())
    numbers = iter(result.best.weights)
    for entry in best["models"]:
        setting = entry["parameters"]["weight"]
        assert [g.get("filter") for g in setting] == ["self_attn", None]
        assert [v for g in setting for v in g["value"]] == [next(numbers) for _ in range(4)]
    merged = _merge_to_disk(str(tmp_path / "run" / "best.yml"), str(tmp_path / "best-merge"))
    model = AutoModelForCausalLM.from_pretrained(config_base(tune_config), dtype=torch.float32)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    first = best["models"][0]["model"]
    assert summary["numbers"][1] == f"{first}: weight filter self_attn point 2 of 2"
    raw = yaml.safe_load(open(tune_config, encoding="utf-8"))
    names = [m["model"] for m in raw["models"]]
    layout = layout_for(raw, names, **space).resolved(
        raw, lambda r: plan_weights(r, MergeOptions(quiet=True))
    )
    merge_config, _ = load_config(tune_config)
    contributions = capture_contributions(merge_config, layout=layout)
    contributions.load_fixed(model)
    contributions.apply(model, result.best.weights)
    state = model.state_dict()
    for name, tensor in merged.items():
        assert (state[name] - tensor).abs().max().item() <= 1e-6, name
    with pytest.raises(RunMismatchError, match="search_space"):
        _run(tune_config, tmp_path / "run", objective, settings, layer_points=3)


@pytest.mark.slow
def test_densities_keep_the_validation_best_and_best_yml_carries_it(
    tune_config, tiny_models, tmp_path
):
    """The target is a merge at density 0.5: the search at 0.5 can reach it, the one at
    0.1 cannot, so 0.5 must win, and best.yml must carry it."""
    target_config = write_config(
        str(tmp_path / "target.yml"), tiny_models, parameters={"lambda": 1.1, "density": 0.5}
    )
    raw = yaml.safe_load(open(target_config, encoding="utf-8"))
    for entry in raw["models"]:
        del entry["parameters"]["density"]
    with open(target_config, "w", encoding="utf-8") as file:
        yaml.safe_dump(raw, file)
    target = _merge_to_disk(target_config, str(tmp_path / "target"), TARGET)
    objective = _distance_objective(target)
    settings = _settings(budget=2 * 30, popsize=7)
    out = tmp_path / "run"
    result = _run(tune_config, out, objective, settings, densities=[0.1, 0.5])
    by_density = {d["density"]: d for d in result.densities}
    assert set(by_density) == {0.1, 0.5}
    assert by_density[0.5]["best_score"] < by_density[0.1]["best_score"]
    assert result.best.score == by_density[0.5]["best_score"]
    for density in (0.1, 0.5):
        history = (out / f"density-{density:g}" / "history.jsonl").read_text().splitlines()
        assert len(history) == by_density[density]["evaluations"] <= 30
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best["parameters"]["density"] == 0.5
    assert all("density" not in m["parameters"] for m in best["models"])
    assert [m["parameters"]["weight"] for m in best["models"]] == result.best.weights
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["density"] == 0.5
    assert [d["density"] for d in summary["densities"]] == [0.1, 0.5]
    # mergekit's merge of best.yml is the tuner's best candidate
    merged = _merge_to_disk(str(out / "best.yml"), str(tmp_path / "best-merge"))
    state = {k: v.float() for k, v in merged.items()}
    assert sum(float((state[k] - v).pow(2).sum()) for k, v in target.items()) == pytest.approx(
        result.best.score, rel=1e-4, abs=1e-9
    )
    # a rerun replays both densities' histories and evaluates nothing
    again = _Interrupt(objective, stop_at=None)
    rerun = _run(tune_config, out, again, settings, densities=[0.1, 0.5])
    assert again.calls == 0 and rerun.best.weights == result.best.weights
    with pytest.raises(RunMismatchError, match="densities"):
        _run(tune_config, out, objective, settings, densities=[0.1, 0.3])
