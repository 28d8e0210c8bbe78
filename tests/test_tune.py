"""The CMA-ES tuner: linear candidates, recovery of known coefficients, resume, failures."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_pcb.merge import load_config, merge_into
from mergekit_pcb.tune import objectives
from mergekit_pcb.tune.capture import capture_contributions
from mergekit_pcb.tune.cli import main as tune_main
from mergekit_pcb.tune.run import tune
from mergekit_pcb.tune.search import (
    AllCandidatesFailedError,
    RunMismatchError,
    SearchSettings,
    run_search,
)
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


def _search(evaluate, tmp_path, budget=25):
    return run_search(
        evaluate,
        2,
        maximize=True,
        out_dir=str(tmp_path),
        identity={"t": 1},
        settings=SearchSettings(budget=budget, popsize=4, seed=5, scale_search=False),
        quiet=True,
    )


def test_failing_candidates_score_worst_and_the_search_goes_on(tmp_path, caplog):
    def evaluate(c, timings):
        if c[0] > 1.4:
            raise RuntimeError("objective exploded")
        if c[1] > 2.5:
            return math.nan
        return -((c[0] - 1.2) ** 2) - (c[1] - 0.9) ** 2

    result = _search(evaluate, tmp_path, budget=41)
    failed = [e for e in result.history if not e.ok]
    assert failed, "the bounds make some candidates fail"
    assert all("objective exploded" in e.error or "not a finite number" in e.error for e in failed)
    assert len(result.history) == 41 and result.best.ok
    assert abs(result.best.weights[0] - 1.2) < 0.15
    assert "failed: RuntimeError: objective exploded" in caplog.text


def test_a_run_where_every_candidate_fails_stops_with_the_first_error(tmp_path):
    calls = []

    def evaluate(c, timings):
        calls.append(c)
        raise ValueError(f"bad data file #{len(calls)}")

    with pytest.raises(AllCandidatesFailedError, match=r"(?s)first error was:.*bad data file #1"):
        _search(evaluate, tmp_path)
    assert len(calls) == 5  # the starting point and one generation, then it stops


def test_completion_loss_matches_a_direct_computation(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["math"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["math"])
    examples = [objectives.Example("12+7=", "19"), objectives.Example("3+4=", "7")]
    total, count = 0.0, 0
    for e in examples:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(e.prompt, add_special_tokens=False)]
        target = tokenizer.encode(e.completion, add_special_tokens=False)
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        for k, token in enumerate(target):
            total -= logp[len(prompt) - 1 + k, token].item()
            count += 1
    assert objectives.completion_loss(model, tokenizer, examples, batch_size=2) == (
        pytest.approx(total / count, rel=1e-5)
    )


def test_exact_match_counts_greedy_completions(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["code"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["code"])
    prompt = "def f("
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]]
    )
    greedy = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    said = tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    if not said.strip():
        pytest.skip("the random model greedily emits whitespace here")
    right = objectives.Example(prompt, said.strip())
    wrong = objectives.Example(prompt, said.strip() + "#")
    assert objectives.exact_match(model, tokenizer, [right, right, wrong, right]) == 0.75


def test_task_files_are_validated(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n\n{"text": "abc"}\n')
    assert objectives.read_task_file(str(good)) == [
        objectives.Example("a", "b"),
        objectives.Example("", "abc"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a row needs"):
        objectives.read_task_file(str(bad))


def test_cli_with_builtin_loss_and_test_split(tune_config, tmp_path):
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(6)
        )
    )
    test.write_text("".join(json.dumps({"text": f"{i} apples"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    args = [
        tune_config,
        str(out),
        "--val",
        str(val),
        "--test",
        str(test),
        "--budget",
        "9",
        "--popsize",
        "4",
        "--combine",
        "normalized",
        "--quiet",
        "--write-model",
    ]
    result = CliRunner().invoke(tune_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "normalized validation loss (lower is better) over 9 evaluations" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"]["weights"] == [1.0, 1.0, 1.0]
    assert {"score", "test_score"} <= summary["best"].keys()
    assert (out / "merged" / "model.safetensors").exists()
    assert len(json.loads((out / "reference_scores.json").read_text())) == 3

    same = CliRunner().invoke(
        tune_main, [tune_config, str(out), "--val", str(val), "--test", str(val)]
    )
    assert same.exit_code != 0 and "is also a validation file" in same.output


def test_lm_eval_objective_through_a_stand_in_harness(monkeypatch, caplog):
    """Our adapter around lm-eval's documented API (lm_eval itself is an optional extra,
    not installed here): the stand-in records the call and returns fixed metrics."""
    import sys
    import types

    calls = {}

    def simple_evaluate(model, tasks, limit):
        calls.update(model=model, tasks=tasks, limit=limit)
        return {"results": {"gsm8k": {"exact_match,none": 0.25}, "my_val": {"acc,none": 0.75}}}

    class HFLM:
        def __init__(self, pretrained, tokenizer):
            self.pretrained, self.tokenizer = pretrained, tokenizer

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)

    objective = objectives.LmEvalObjective(["gsm8k", "my_val"], limit=10)
    assert "lm-eval task 'gsm8k' looks like a public benchmark" in caplog.text
    assert "my_val" not in caplog.text
    assert objective("model", "tok") == 0.5 and objective.maximize
    assert calls["tasks"] == ["gsm8k", "my_val"] and calls["limit"] == 10
    assert calls["model"].pretrained == "model"


def test_lm_eval_objective_without_the_extra_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'lm_eval>=0\.4'"):
        objectives.LmEvalObjective(["my_val"])
