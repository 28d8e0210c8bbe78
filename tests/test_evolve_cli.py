"""``mergekit-pcb-evolve`` end to end on the tiny models: what it writes, that mergekit
reproduces it, resuming and extending, individual mode, and bad input.

The expectations are computed apart from the command: the evolved individuals are
rebuilt from the original checkpoints and the recorded history with the offspring
formula (``u = x_i + m f (x_r - x_i)``, the mask drawn by ``crossover_mask``), and
``best.yml`` is merged by mergekit's own ``run_merge``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

import mergekit_pcb  # noqa: F401  (registers pcb)
import mergekit_pcb.evolve.job as job_module
from mergekit_pcb.config_check import read_raw_config
from mergekit_pcb.evolve.cli import main
from mergekit_pcb.evolve.job import evolve
from mergekit_pcb.evolve.offspring import crossover_mask, mask_seed
from mergekit_pcb.evolve.settings import EvolveSettings
from mergekit_pcb.tune.objectives import validation_loss
from tests.conftest import write_config

FINETUNES = ("math", "code", "chat")


@pytest.fixture(scope="module")
def val(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("evolve-data") / "val.jsonl"
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("evolve-test") / "test.jsonl"
    rows = [{"prompt": f"{i}-1=", "completion": str(i - 1)} for i in range(3, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, models: dict[str, str], method: str, name: str = "c.yml") -> str:
    per_model = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
    config = {
        "merge_method": method,
        "base_model": models["base"],
        "models": [
            {"model": models[n], "parameters": dict(per_model)} for n in FINETUNES if n in models
        ],
        "dtype": "float32",
    }
    if method == "pcb":
        config["parameters"] = {"lambda": 1.0}
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file)
    return path


def _run(config: str, out: str, val: str, *, test: str | None = None, **settings):
    return evolve(
        read_raw_config(config, strict=True),
        out,
        validation_loss([val]),
        EvolveSettings(**settings),
        identity_objective={"kind": "loss", "val": [val]},
        test_objective=validation_loss([test]) if test else None,
        device="cpu",
        quiet=True,
    )


def _state(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def _rebuilt_population(models: dict[str, str], history, settings: EvolveSettings):
    """The individuals after the recorded history, from the originals and the formula."""
    population = [_state(models[n]) for n in FINETUNES]
    for row in history:
        if not row.accepted:
            continue
        parent, partner = population[row.individual], population[row.partner]
        child = {}
        for name, x_i in parent.items():
            seed = mask_seed(settings.seed, row.generation, row.individual, name)
            mask = crossover_mask(x_i.numel(), settings.cr, seed).view(x_i.shape)
            mixed = x_i + mask.float() * settings.f * (partner[name] - x_i)
            child[name] = torch.where(mask, mixed, x_i)
        population[row.individual] = child
    return population


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), name


@pytest.mark.parametrize("method", ["pcb", "ties", "task_arithmetic"])
def test_best_yml_remerged_by_mergekit_is_the_evolved_merge(
    tiny_models, val, tmp_path, monkeypatch, method
):
    """The merge the command scored last (the result, in its live model) equals
    mergekit's run_merge of best.yml; the population folders equal the originals evolved
    by the recorded history through the offspring formula."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    original = job_module._write_outputs

    def capture(job, live, evolution, *args):
        live.write_result(evolution)
        seen["live"] = {k: v.detach().clone() for k, v in live.model.state_dict().items()}
        return original(job, live, evolution, *args)

    monkeypatch.setattr(job_module, "_write_outputs", capture)
    config = _config(tmp_path, tiny_models, method)
    settings = EvolveSettings(generations=2, seed=3)
    out = str(tmp_path / "run")
    result = _run(config, out, val, generations=2, seed=3)

    kept = [row for row in result.history if row.accepted]
    assert kept, "no offspring was kept: the test would not see evolution"
    rebuilt = _rebuilt_population(tiny_models, result.history, settings)
    for i, name in enumerate(FINETUNES):
        folder = os.path.join(out, "population", name)
        _assert_same_state(_state(folder), rebuilt[i])
        assert {"config.json", "tokenizer.json"} <= set(os.listdir(folder))

    best = yaml.safe_load(open(os.path.join(out, "best.yml"), encoding="utf-8"))
    assert [m["model"] for m in best["models"]] == [
        os.path.abspath(os.path.join(out, "population", n)) for n in FINETUNES
    ]
    merged = str(tmp_path / "merged")
    run_merge(MergeConfiguration.model_validate(best), merged, MergeOptions(quiet=True))
    from_mergekit = _state(merged)
    live = {k: v for k, v in seen["live"].items() if k in from_mergekit}
    assert live.keys() == from_mergekit.keys()
    _assert_same_state(live, from_mergekit, atol=1e-6)


def test_outputs_history_and_summary(tiny_models, val, test_file, tmp_path):
    config = _config(tmp_path, tiny_models, "pcb")
    out = str(tmp_path / "run")
    result = _run(config, out, val, test=test_file, generations=1, seed=1)
    rows = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert [r["index"] for r in rows] == list(range(1 + len(FINETUNES)))
    assert rows[0]["generation"] is None and rows[0]["individual"] is None
    assert sorted(r["individual"] for r in rows[1:]) == [0, 1, 2]
    for r in rows[1:]:
        assert r["partner"] != r["individual"] and 0 <= r["partner"] < 3
    for key in ("generation", "individual", "partner", "accepted", "score", "seconds"):
        assert key in rows[0]
    # Acceptance is strict improvement on the best so far (a loss: lower).
    best = rows[0]["score"]
    for r in rows[1:]:
        assert r["accepted"] == (r["score"] < best)
        best = min(best, r["score"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["start"]["score"] == rows[0]["score"]
    assert summary["result"]["score"] == best
    assert set(summary["start"]) == {"score", "test_score"}
    assert summary["result"]["test_score"] == result.test_scores["result"]
    accepted = {
        n: sum(r["accepted"] for r in rows if r["individual"] == i)
        for i, n in enumerate(summary["models"])
    }
    assert {n: a["accepted"] for n, a in summary["acceptances"].items()} == accepted
    stored = sum(
        t.numel() * t.element_size()
        for n in ("base", *FINETUNES)
        for t in _state(tiny_models[n]).values()
    )
    assert summary["memory"]["bytes"] == {"cpu": stored}
    assert os.path.getsize(os.path.join(out, "scores.png")) > 0


def test_resumed_and_extended_runs_equal_a_straight_run(tiny_models, val, tmp_path):
    config = _config(tmp_path, tiny_models, "ties")
    straight = str(tmp_path / "straight")
    _run(config, straight, val, generations=3, seed=3)

    # Interrupted at the 6th evaluation (Ctrl-C inside the objective), then resumed.
    resumed = str(tmp_path / "resumed")
    calls = {"n": 0}
    loss = validation_loss([val])

    class Interrupting:
        name, maximize = loss.name, loss.maximize

        def __call__(self, model, tokenizer):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return loss(model, tokenizer)

    with pytest.raises(KeyboardInterrupt):
        evolve(
            read_raw_config(config),
            resumed,
            Interrupting(),
            EvolveSettings(generations=3, seed=3),
            identity_objective={"kind": "loss", "val": [val]},
            device="cpu",
            quiet=True,
        )
    assert len(open(os.path.join(resumed, "history.jsonl")).readlines()) == 5
    again = _run(config, resumed, val, generations=3, seed=3)
    assert again.resumed == 5

    # Extended: one generation, then three in the same folder.
    extended = str(tmp_path / "extended")
    _run(config, extended, val, generations=1, seed=3)
    more = _run(config, extended, val, generations=3, seed=3)
    assert more.resumed == 1 + len(FINETUNES)

    def rows(folder):
        out = [json.loads(line) for line in open(os.path.join(folder, "history.jsonl"))]
        return [
            {k: r[k] for k in ("index", "individual", "partner", "accepted", "score")} for r in out
        ]

    # The replayed part holds a kept offspring, which the resumed run had to make again.
    assert any(r["accepted"] for r in rows(straight)[:5])
    assert any(r["accepted"] for r in rows(straight)[5:])
    for other in (resumed, extended):
        assert rows(other) == rows(straight)
        for name in FINETUNES:
            _assert_same_state(
                _state(os.path.join(other, "population", name)),
                _state(os.path.join(straight, "population", name)),
            )


def test_individual_mode_returns_the_best_individual(tiny_models, val, tmp_path):
    config = _config(tmp_path, tiny_models, "task_arithmetic")
    out = str(tmp_path / "run")
    result = _run(config, out, val, generations=2, seed=2, mode="individual")
    assert len(result.history) == 3 + 2 * 3
    # Score every evolved individual afresh, as transformers loads its folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loss = validation_loss([val])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["base"])
    scores = {}
    for name in FINETUNES:
        folder = os.path.join(out, "population", name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        scores[name] = loss(model, tokenizer)
    best = min(scores, key=scores.get)
    assert result.best_individual == tiny_models[best]
    assert result.result_score == pytest.approx(scores[best], rel=1e-6)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["result"]["folder"] == os.path.abspath(os.path.join(out, "population", best))


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("f", ["--f", "1.5"], "Error: --f must be in [0, 1], got 1.5"),
        ("f", ["--f", "-0.1"], "Error: --f must be in [0, 1], got -0.1"),
        ("cr", ["--cr", "0"], "Error: --cr must be in (0, 1], got 0.0"),
        ("cr", ["--cr", "1.2"], "Error: --cr must be in (0, 1], got 1.2"),
        ("budget", ["--budget", "0"], "Error: --budget must be 1 or more, got 0"),
    ],
)
def test_bad_settings_are_one_error_line_and_nothing_written(
    tiny_models, val, tmp_path, case, args, message
):
    config = _config(tmp_path, tiny_models, "pcb")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [config, str(out), "--val", val, *args])
    assert result.exit_code == 1
    assert _lines(result) == [message]
    assert not out.exists()


def test_bad_configs_are_one_error_line_and_nothing_written(tiny_models, val, tmp_path):
    out = tmp_path / "out"
    one = _config(
        tmp_path, {"base": tiny_models["base"], "math": tiny_models["math"]}, "ties", name="one.yml"
    )
    result = CliRunner().invoke(main, [one, str(out), "--val", val])
    assert _lines(result) == [
        f"Error: {one}: the evolver needs at least two models besides the base to cross; "
        "the config has 1"
    ]

    unknown = write_config(
        str(tmp_path / "ties.yml"),
        tiny_models,
        merge_method="ties",
        per_model={"code": {"desnity": 0.3}},
        parameters={},
    )
    result = CliRunner().invoke(main, [unknown, str(out), "--val", val])
    assert result.exit_code == 1
    (line,) = _lines(result)
    assert line.startswith(f"Error: {unknown}: models[")
    assert (
        f"(model {tiny_models['code']}): unknown ties parameter 'desnity', which mergekit "
        "would ignore; did you mean 'density'?" in line
    )

    plus = tmp_path / "a+b"
    result = CliRunner().invoke(
        main, [_config(tmp_path, tiny_models, "ties"), str(plus), "--val", val]
    )
    assert _lines(result) == [
        f"Error: {plus}: the output folder's path contains '+', which mergekit reads in "
        "best.yml's model paths as model+LoRA; choose a folder without it"
    ]
    assert not plus.exists()

    pcb = write_config(str(tmp_path / "pcb.yml"), tiny_models, parameters={"lamda": 1.0})
    result = CliRunner().invoke(main, [pcb, str(out), "--val", val])
    assert result.exit_code == 1
    (line,) = _lines(result)
    assert "unknown pcb parameter 'lamda'" in line and line.startswith(f"Error: {pcb}: ")
    assert not out.exists()


def test_another_setting_is_refused_naming_it(tiny_models, val, tmp_path):
    config = _config(tmp_path, tiny_models, "task_arithmetic")
    out = str(tmp_path / "out")
    first = CliRunner().invoke(main, [config, out, "--val", val, "--generations", "1", "--quiet"])
    assert first.exit_code == 0, first.output
    lines = _lines(first)
    assert lines[0].startswith("validation loss (lower is better), merged mode, over 4 evaluations")
    assert lines[-1] == f"best config: {os.path.join(out, 'best.yml')}"
    history = open(os.path.join(out, "history.jsonl")).read()
    second = CliRunner().invoke(main, [config, out, "--val", val, "--f", "0.3", "--quiet"])
    assert second.exit_code == 1
    (line,) = _lines(second)
    assert line.startswith(f"Error: {out} holds a different evolver run (differs in: settings.f")
    assert open(os.path.join(out, "history.jsonl")).read() == history


def test_normalized_objective_divides_by_the_best_fine_tune(tiny_models, val, tmp_path):
    """--combine normalized: the start is the config's merge's loss over the lowest loss of
    any original fine-tune alone, each scored here from folders transformers loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _config(tmp_path, tiny_models, "pcb")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [config, str(out), "--val", val, "--combine", "normalized", "--generations", "1"],
    )
    assert result.exit_code == 0, result.output
    summary = json.load(open(out / "summary.json"))
    assert summary["failed"] == 0

    loss = validation_loss([val])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["base"])

    def score(folder: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return loss(model, tokenizer)

    merged = str(tmp_path / "merged")
    raw = yaml.safe_load(open(config, encoding="utf-8"))
    run_merge(MergeConfiguration.model_validate(raw), merged, MergeOptions(quiet=True))
    best_alone = min(score(tiny_models[n]) for n in FINETUNES)
    assert summary["start"]["score"] == pytest.approx(score(merged) / best_alone, rel=1e-9)
    assert (out / "reference_scores.json").exists()


def test_a_run_whose_every_candidate_fails_stops_with_the_first_error(tiny_models, val, tmp_path):
    objective = tmp_path / "broken.py"
    objective.write_text("def score(model, tokenizer):\n    raise ValueError('boom')\n")
    config = _config(tmp_path, tiny_models, "task_arithmetic")
    out = tmp_path / "run"
    args = [config, str(out), "--objective", "function", "--function", f"{objective}:score"]
    result = CliRunner().invoke(main, [*args, "--maximize", "--generations", "3", "--quiet"])
    assert result.exit_code == 1
    assert (
        _lines(result)[-1] == "Error: every candidate failed; the first error was: ValueError: boom"
    )
    # The start and the first generation were tried (and recorded), no more.
    assert len(open(out / "history.jsonl").readlines()) == 1 + len(FINETUNES)
