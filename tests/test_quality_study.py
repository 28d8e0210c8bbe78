"""The merge-quality study's own machinery (benchmarks/quality): the parts its numbers rest on.

The study itself is too slow for the test suite; these check the shortcuts it takes
(lambda scaling, trimmed scoring), the expert replay, that its model cache is reused,
and the tuned rows' search and merge.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from benchmarks.quality.quality_eval import score_task
from benchmarks.quality.quality_evolve import evolve_population
from benchmarks.quality.quality_merge import (
    ABLATIONS,
    METHODS,
    merge_in_memory,
    merge_with_mergekit,
    mergekit_config,
    scale_merge,
)
from benchmarks.quality.quality_models import (
    ModelSettings,
    TrainSettings,
    build_models,
    encode_batch,
    llama_config,
)
from benchmarks.quality.quality_tasks import BASE_KEYS, KEYS, TASKS, TrainStream, make_splits
from benchmarks.quality.quality_tune import read_yaml_config, tune_weights
from mergekit_pcb.synthetic import tiny_tokenizer

TASK_NAMES = tuple(task.name for task in TASKS)


def _states(n_experts: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (16, 24), "layer.bias": (24,), "other.weight": (8, 8)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    experts = {
        f"e{i}": {
            name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in base.items()
        }
        for i in range(n_experts)
    }
    return base, experts


@pytest.mark.parametrize("spec", (*METHODS, *ABLATIONS), ids=lambda spec: spec.label)
def test_scaled_merge_is_the_merge_at_that_lambda(spec) -> None:
    base, experts = _states(3)
    density = spec.densities[1] if len(spec.densities) > 1 else spec.densities[0]
    unit = merge_in_memory(spec, {"density": density, "lambda": 1.0}, base, experts)
    for lam in (0.3, 1.6):
        direct = merge_in_memory(spec, {"density": density, "lambda": lam}, base, experts)
        scaled = scale_merge(base, unit, lam)
        for name, tensor in direct.items():
            torch.testing.assert_close(scaled[name], tensor, rtol=1e-5, atol=1e-6)
        # Not trivially equal: the merge moved away from the base.
        assert any(not torch.equal(direct[name], base[name]) for name in base)


def test_replay_draws_the_base_mixture_and_never_a_held_out_prompt() -> None:
    splits = make_splits(20, 20, seed=0)
    stream = TrainStream(
        ("shift",), KEYS, splits, seed=3, replay=0.5, replay_tasks=TASK_NAMES, replay_keys=BASE_KEYS
    )
    examples = stream.batch(4000)
    held_out = {name: splits.held_out(name) for name in TASK_NAMES}
    tags = {task.tag: task.name for task in TASKS}
    others = 0
    for example in examples:
        task = tags[example.prompt[:3]]
        assert example.prompt not in held_out[task]
        if task != "shift":
            others += 1
            assert example.key in BASE_KEYS
    # Half the draws replay the mixture of 8 tasks, one of which is shift itself.
    assert abs(others / len(examples) - 0.5 * 7 / 8) < 0.03
    assert {e.key for e in examples if e.prompt.startswith("rot")} == set(KEYS)


def test_replay_needs_its_tasks_and_keys() -> None:
    splits = make_splits(5, 5, seed=0)
    with pytest.raises(ValueError, match="replay needs replay_tasks and replay_keys"):
        TrainStream(("shift",), KEYS, splits, seed=0, replay=0.5)


def test_trimmed_scoring_matches_a_full_forward_pass() -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(ModelSettings(32, 64, 1, 2), len(tokenizer))).eval()
    examples = make_splits(40, 5, seed=0).val["encode"]
    score = score_task(model, tokenizer, examples)
    # Second computation: the whole padded sequence, answer positions picked by hand.
    ids, mask, labels = encode_batch(tokenizer, examples)
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    right = total = exact = 0
    for row, example in enumerate(examples):
        start = int((labels[row] != -100).nonzero()[0])
        hits = [
            int(predicted[row, start + i - 1]) == int(labels[row, start + i])
            for i in range(len(example.answer))
        ]
        right += sum(hits)
        total += len(hits)
        exact += all(hits)
    assert score.char_acc == pytest.approx(right / total)
    assert score.exact == pytest.approx(exact / len(examples))


def test_trained_models_are_reused_and_only_changed_ones_retrained(tmp_path) -> None:
    splits = make_splits(5, 5, seed=0)
    model = ModelSettings(32, 64, 1, 2)
    base = TrainSettings(tasks=TASK_NAMES, keys=BASE_KEYS, steps=2, lr=1e-3, batch_size=4, seed=0)

    def expert(task: str, steps: int = 2) -> TrainSettings:
        return TrainSettings(
            tasks=(task,), keys=KEYS, steps=steps, lr=1e-3, batch_size=4, seed=1,
            replay=0.5, replay_tasks=TASK_NAMES, replay_keys=BASE_KEYS,
        )  # fmt: skip

    experts = {"shift": expert("shift"), "encode": expert("encode")}
    _, first = build_models(str(tmp_path), model, base, experts, splits)
    assert set(first) == {"base", "shift", "encode"}
    _, second = build_models(str(tmp_path), model, base, experts, splits)
    assert second == {}
    experts["encode"] = expert("encode", steps=3)
    _, third = build_models(str(tmp_path), model, base, experts, splits)
    assert set(third) == {"encode"}


def _state(path: str) -> dict[str, torch.Tensor]:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_tuned_task_arithmetic_keeps_the_grid_lambda_and_best_yml_is_the_tuned_merge(
    tiny_models, tmp_path
) -> None:
    spec = next(spec for spec in METHODS if spec.label == "task_arithmetic")
    setting = {"density": 1.0, "lambda": 0.45}
    experts = {name: path for name, path in tiny_models.items() if name != "base"}
    config_file = tmp_path / "grid.yml"
    config_file.write_text(
        yaml.safe_dump(mergekit_config(spec, setting, tiny_models["base"], experts))
    )
    base = _state(tiny_models["base"])
    expert_states = {name: _state(path) for name, path in experts.items()}
    # Weights beyond the box [0.5, 3] around the start 1: reachable only through the
    # common scale, as task_arithmetic's summing weights may need.
    target = merge_in_memory(spec, setting, base, expert_states, [2.4, 1.6, 3.6])

    def objective(model, tokenizer) -> float:
        state = model.state_dict()
        return -sum(float((state[name] - target[name]).square().sum()) for name in target)

    budget = 9 + 2 * 7  # the scale search, then two generations of 7 for 3 models
    tuned = tune_weights(
        str(config_file), str(tmp_path / "tune"), objective, budget, identity={"test": 1}
    )
    assert tuned["evaluations"] == budget
    assert tuned["start_weights"] == [1.0, 1.0, 1.0]
    assert tuned["best_scale"] > 1
    assert (
        tuned["val_objective_start"]
        < tuned["val_objective_best_scale"]
        <= tuned["val_objective_best"]
    )

    best = read_yaml_config(tuned["best_yml"])
    assert best["merge_method"] == "task_arithmetic"
    assert best["parameters"] == {"lambda": 0.45}  # the grid's lambda, no normalize added
    assert [m["model"] for m in best["models"]] == list(experts.values())
    assert [m["parameters"]["weight"] for m in best["models"]] == tuned["weights"]

    # best.yml merged the mergekit-yaml way is the merge the tuner scored as its best.
    out = str(tmp_path / "tuned")
    merge_with_mergekit(best, out, random=False)
    merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = merge_in_memory(spec, setting, base, expert_states, tuned["weights"])
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    assert objective(merged, None) == pytest.approx(tuned["val_objective_best"], rel=1e-4)


def test_evolver_rows_run_the_budget_and_best_yml_scores_what_the_evolver_scored(
    tiny_models, tmp_path
) -> None:
    spec = next(spec for spec in METHODS if spec.label == "pcb")
    setting = {"density": 0.6, "lambda": 1.0}
    experts = {name: path for name, path in tiny_models.items() if name != "base"}
    config_file = tmp_path / "grid.yml"
    config_file.write_text(
        yaml.safe_dump(mergekit_config(spec, setting, tiny_models["base"], experts))
    )
    base = _state(tiny_models["base"])
    # A target the experts' entries can move towards: the base plus half the mean task vector.
    expert_states = [_state(path) for path in experts.values()]
    target = {
        name: base[name] + 0.5 * sum(e[name] - base[name] for e in expert_states) / 3
        for name in base
    }

    def objective(model, tokenizer) -> float:
        state = model.state_dict()
        return -sum(float((state[name] - target[name]).square().sum()) for name in target)

    budget = 8  # the start, then 7 offspring: 3 generations of 3, cut by the budget
    evolved = evolve_population(
        str(config_file), str(tmp_path / "evolve"), objective, budget, 3, identity={"test": 1}
    )
    assert evolved["evaluations"] == budget
    assert evolved["settings"]["generations"] == 3
    assert evolved["accepted"] >= 1  # evolution changed the experts
    assert evolved["val_objective_result"] > evolved["val_objective_start"]
    assert evolved["accepted"] == sum(a["accepted"] for a in evolved["acceptances"].values())

    # best.yml merged the mergekit-yaml way scores what the Evolver's own merge scored.
    best = read_yaml_config(evolved["best_yml"])
    assert all("/evolve/population/" in m["model"] for m in best["models"])
    out = str(tmp_path / "evolved")
    merge_with_mergekit(best, out, random=False)
    merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert objective(merged, None) == pytest.approx(evolved["val_objective_result"], rel=1e-9)


def test_row_cache_reuses_a_row_only_when_its_inputs_match(tmp_path) -> None:
    from benchmarks.quality.run_study import RowCache

    calls: list[int] = []

    def compute(value: int) -> dict[str, int]:
        calls.append(value)
        return {"value": value}

    tasks = ("shift", "encode")
    first = RowCache(str(tmp_path), {"n_val": 150}, fresh=False)
    assert first.row(tasks, "pcb", compute, 1) == {"value": 1}
    # Stored: a later run with the same inputs does not compute it again.
    assert RowCache(str(tmp_path), {"n_val": 150}, fresh=False).row(tasks, "pcb", compute, 2) == {
        "value": 1
    }
    # Other inputs, another row of the subset, or --fresh: computed (and stored) anew.
    assert RowCache(str(tmp_path), {"n_val": 50}, fresh=False).row(tasks, "pcb", compute, 3) == {
        "value": 3
    }
    assert first.row(tasks, "ties", compute, 4) == {"value": 4}
    assert RowCache(str(tmp_path), {"n_val": 50}, fresh=True).row(tasks, "pcb", compute, 5) == {
        "value": 5
    }
    assert calls == [1, 3, 4, 5]
    assert not list(tmp_path.rglob("*.partial"))
