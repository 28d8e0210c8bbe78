"""The objectives (``objectives.py``) against direct computations, and the objective as a
command line chooses it (``objective_options.py``)."""

from __future__ import annotations

import hashlib
import json

import click
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_pcb.tune import objectives
from mergekit_pcb.tune.objective_options import ObjectiveOptions, objective_options


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


# --- the objective options -----------------------------------------------------------


@pytest.fixture
def task_files(tmp_path) -> tuple[str, str]:
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    test.write_text(json.dumps({"text": "3 apples"}) + "\n")
    return str(val), str(test)


def test_the_options_build_the_validation_and_the_test_objective(task_files):
    val, test = task_files
    objective, test_objective = ObjectiveOptions(
        kind="exact-match", val=(val,), test=(test,), combine="normalized"
    ).build()
    assert (objective.name, objective.maximize, objective.normalized) == (
        "normalized validation accuracy",
        True,
        True,
    )
    # The test files are reported as a plain mean, never normalised.
    assert (test_objective.name, test_objective.normalized) == ("validation accuracy", False)
    assert [list(task) for task in test_objective.tasks] == [[objectives.Example("", "3 apples")]]
    assert ObjectiveOptions(val=(val,)).build()[1] is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "loss"}, "--objective loss needs at least one --val FILE"),
        ({"kind": "function"}, "--objective function needs --function pkg.module:function"),
        ({"kind": "lm-eval"}, "--objective lm-eval needs at least one --lm-eval-task"),
        (
            {"kind": "function", "function": "math:sqrt", "maximize": True, "test": ("T",)},
            "--test files are scored with --objective loss or exact-match",
        ),
    ],
)
def test_incomplete_options_are_refused(task_files, options, message):
    _, test = task_files
    options = {**options, "test": (test,) if "test" in options else ()}
    with pytest.raises(ValueError, match=message):
        ObjectiveOptions(**options).build()


def test_a_test_file_that_is_a_validation_file_is_refused(task_files, tmp_path):
    val, _ = task_files
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(open(val, "rb").read())
    for test in (val, str(copy)):  # by path, and by content
        with pytest.raises(ValueError, match=f"test file {test} is also a validation file"):
            ObjectiveOptions(val=(val,), test=(test,)).build()


def test_the_identity_names_the_validation_files_by_content(task_files):
    val, test = task_files
    identity = ObjectiveOptions(val=(val,), test=(test,), combine="normalized").identity()
    assert identity == {
        "kind": "loss",
        "combine": "normalized",
        "function": None,
        "maximize": None,
        "val": [{"path": val, "sha256": hashlib.sha256(open(val, "rb").read()).hexdigest()}],
        "lm_eval_tasks": [],
    }


def test_the_decorator_gives_a_command_one_objective_spec(task_files):
    """Another command takes the same options: it gets them as one ObjectiveOptions,
    between its own arguments and options."""
    val, test = task_files
    seen = {}

    @click.command()
    @click.argument("name")
    @objective_options
    @click.option("--generations", type=int, default=3)
    def evolve(name: str, objective_spec: ObjectiveOptions, generations: int) -> None:
        """Evolve NAME."""
        seen.update(name=name, spec=objective_spec, generations=generations)

    args = ["x", "--val", val, "--test", test, "--objective", "exact-match", "--maximize"]
    result = CliRunner().invoke(evolve, [*args, "--lm-eval-task", "a", "--generations", "5"])
    assert result.exit_code == 0, result.output
    assert seen == {
        "name": "x",
        "spec": ObjectiveOptions(
            kind="exact-match", val=(val,), test=(test,), maximize=True, lm_eval_tasks=("a",)
        ),
        "generations": 5,
    }
    names = [p.name for p in evolve.params]
    assert names == [
        "name",
        "kind",
        "val",
        "test",
        "combine",
        "function",
        "maximize",
        "lm_eval_task",
        "lm_eval_limit",
        "generations",
    ]
    assert "Evolve NAME." in CliRunner().invoke(evolve, ["--help"]).output
    CliRunner().invoke(evolve, ["y", "--val", val])
    assert seen["spec"] == ObjectiveOptions(val=(val,))  # the options' defaults are its own
