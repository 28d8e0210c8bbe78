"""``mergekit-pcb-tune`` as a user meets it: one-line errors, resume, extension, output,
the progress bar."""

from __future__ import annotations

import json
import logging

import click
import matplotlib.figure
import pytest
from click.testing import CliRunner

import mergekit_pcb.tune.driver as driver
import mergekit_pcb.tune.job as job
from mergekit_pcb.errors import ConfigError
from mergekit_pcb.tune.cli import main
from mergekit_pcb.tune.run_dir import HISTORY_FILE
from mergekit_pcb.tune.search import SearchSettings
from tests.bars import RecordingBar as _Bar
from tests.conftest import write_config
from tests.search_helpers import Bowl, run_test_search

ROWS = "one JSON object per line, with 'prompt' and 'completion', or 'text'"


@pytest.fixture(scope="module")
def config(tiny_models, tmp_path_factory) -> str:
    return write_config(str(tmp_path_factory.mktemp("tune-cli") / "pcb.yml"), tiny_models)


@pytest.fixture
def val(tmp_path) -> str:
    path = tmp_path / "val.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", ": no examples (no line that is not blank); expected " + ROWS),
        (b"\n  \n", ": no examples (no line that is not blank); expected " + ROWS),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n',
            ":2: not JSON (Expecting property name enclosed in double quotes at column 16); "
            "a task file holds " + ROWS,
        ),
        (
            b'{"question": "a", "answer": "b"}\n',
            ":1: a row needs 'prompt'+'completion' or 'text'; got keys 'question', 'answer'",
        ),
        (b"[1, 2]\n", ":1: a row needs 'prompt'+'completion' or 'text'; got [1, 2]"),
        (b'{"text": ""}\n', ": every 'completion' (or 'text') is empty: nothing to score"),
        (b'{"text": "\xff"}\n', ": not UTF-8 text (byte 10: invalid start byte)"),
    ],
)
@pytest.mark.parametrize("option", ["--val", "--test"])
def test_data_file_errors_are_one_line_naming_the_file(
    config, val, tmp_path, content, problem, option
):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    files = ["--val", str(bad)] if option == "--val" else ["--val", val, "--test", str(bad)]
    result = CliRunner().invoke(main, [config, str(tmp_path / "out"), *files])
    assert result.exit_code == 1
    assert _lines(result) == [f"Error: {bad}{problem}"]


def test_config_errors_are_one_line_and_debug_shows_them(tiny_models, val, tmp_path):
    missing = str(tmp_path / "gone")
    config = write_config(str(tmp_path / "pcb.yml"), {**tiny_models, "chat": missing})
    args = [config, str(tmp_path / "out"), "--val", val]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert _lines(result) == [
        f"Error: {config}: model {missing}: no such folder, and not a Hugging Face repo id"
    ]
    debug = CliRunner().invoke(main, [*args, "--debug"])
    assert isinstance(debug.exception, ConfigError)


def test_search_space_errors_are_one_line_and_write_nothing(tiny_models, val, tmp_path):
    config = write_config(
        str(tmp_path / "ta.yml"),
        tiny_models,
        merge_method="task_arithmetic",
        per_model={"code": {"weight": [1.0, "many"]}},
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [config, str(out), "--val", val])
    assert result.exit_code == 1
    assert _lines(result) == [
        f"Error: {config}: {tiny_models['code']}: weight: [1.0, 'many'] is not a number, a list "
        "of numbers (a gradient) or a list of {filter, value} entries whose values are those; "
        "the tuner searches the numbers of a weight setting, so it needs them to be numbers"
    ]
    assert not out.exists()
    result = CliRunner().invoke(main, [config, str(out), "--val", val, "--module-groups", ",mlp"])
    assert _lines(result) == ["Error: --module-groups needs distinct non-empty names, got ',mlp'"]
    assert not out.exists()


def test_densities_errors_are_one_line_and_write_nothing(tiny_models, val, tmp_path):
    out = tmp_path / "out"
    gradient = write_config(
        str(tmp_path / "g.yml"), tiny_models, per_model={"code": {"density": [0.2, 0.4]}}
    )
    task_arithmetic = write_config(
        str(tmp_path / "ta.yml"), tiny_models, merge_method="task_arithmetic"
    )
    code = tiny_models["code"]
    cases = [
        (
            gradient,
            "0.1,0.2",
            f"Error: {gradient}: {code}: density [0.2, 0.4] varies from tensor "
            "to tensor, and --densities sets one density for every model and tensor: write one "
            "number, or leave out --densities",
        ),
        (
            task_arithmetic,
            "0.1",
            f"Error: {task_arithmetic}: --densities searches pcb's density; "
            "merge_method: task_arithmetic has none that the tuner can search",
        ),
        (gradient, "0.1,1.5", "Error: --densities: each density must be in (0, 1], got 1.5"),
        (gradient, "0.1,0.1", "Error: --densities: each density once, got 0.1,0.1"),
    ]
    for config, densities, line in cases:
        result = CliRunner().invoke(
            main, [config, str(out), "--val", val, "--densities", densities]
        )
        assert result.exit_code == 1
        assert _lines(result) == [line]
        assert not out.exists()
    result = CliRunner().invoke(main, [gradient, str(out), "--val", val, "--densities", "a,b"])
    assert (
        result.exit_code == 2 and "expected numbers separated by commas, got 'a,b'" in result.output
    )


def test_every_option_has_help():
    options = [p for p in main.params if isinstance(p, click.Option)]
    assert len(options) >= 25
    assert [o.name for o in options if not (o.help or "").strip()] == []
    assert "--debug" in CliRunner().invoke(main, ["--help"]).output


@pytest.mark.slow
def test_resume_extend_and_refuse_through_the_command(config, val, tmp_path, caplog, monkeypatch):
    titles = []
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, path, *args, **kwargs):
        titles.append(figure.axes[0].get_title())
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    out = tmp_path / "out"
    base = [config, str(out), "--val", val, "--popsize", "4", "--no-scale-search", "--quiet"]

    first = CliRunner().invoke(main, [*base, "--budget", "5"])
    assert first.exit_code == 0, first.output
    assert "validation loss (lower is better) over 5 evaluations\n" in first.output
    assert titles == ["validation loss"]  # scores.png names the objective
    rows = (out / HISTORY_FILE).read_text().splitlines()
    assert len(rows) == 5

    with caplog.at_level(logging.INFO, logger="mergekit_pcb"):
        more = CliRunner().invoke(main, [*base, "--budget", "9"])
    assert more.exit_code == 0, more.output
    assert "resuming: 5 evaluations from history.jsonl" in caplog.text
    assert "over 9 evaluations (5 of them resumed from history.jsonl)\n" in more.output
    extended = (out / HISTORY_FILE).read_text().splitlines()
    assert extended[:5] == rows and len(extended) == 9  # the first five kept as they were

    other = CliRunner().invoke(main, [*base, "--budget", "9", "--seed", "2"])
    assert other.exit_code == 1
    assert _lines(other) == [
        f"Error: {out} holds a different tuning run (differs in: settings.seed 1 -> 2); "
        "use another output directory, or delete this one to start over"
    ]

    def no_capture(*args, **kwargs):
        raise AssertionError("the budget is refused before any heavy work")

    monkeypatch.setattr(job, "capture_contributions", no_capture)
    fewer = CliRunner().invoke(main, [*base, "--budget", "6"])
    assert fewer.exit_code == 1
    assert _lines(fewer) == [
        f"Error: {out} already holds 9 evaluations, more than --budget 6; give a budget of "
        "at least 9 to extend the run"
    ]
    assert (out / HISTORY_FILE).read_text().splitlines() == extended


@pytest.mark.slow
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
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "normalized validation loss (lower is better) over 9 evaluations" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"]["weights"] == [1.0, 1.0, 1.0]
    assert {"score", "test_score"} <= summary["best"].keys()
    assert (out / "merged" / "model.safetensors").exists()
    assert len(json.loads((out / "reference_scores.json").read_text())) == 3

    same = CliRunner().invoke(main, [tune_config, str(out), "--val", str(val), "--test", str(val)])
    assert same.exit_code != 0 and "is also a validation file" in same.output


# --- the progress bar of the search ---------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "settings"),
    [(13, {}), (30, {}), (100, {}), (12, {}), (30, {"lower": 0.1, "upper": 3.0})],
)
def test_the_progress_total_is_what_runs(tmp_path, monkeypatch, budget, settings):
    monkeypatch.setattr(driver, "tqdm", _Bar)
    _Bar.made.clear()
    result = run_test_search(tmp_path, Bowl((1.3, 0.7)), _settings(budget, **settings))
    [bar] = _Bar.made
    assert bar.first_total == len(result.history) == bar.n


@pytest.mark.parametrize("budget", [13, 16])
def test_the_progress_total_is_what_runs_with_the_scale_on_its_edge(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(driver, "tqdm", _Bar)
    _Bar.made.clear()
    result = run_test_search(tmp_path, Bowl((20.0, 20.0)), _settings(budget))  # best scale: 8
    [bar] = _Bar.made
    assert bar.first_total == len(result.history) == bar.n


def _settings(budget: int, **settings) -> SearchSettings:
    return SearchSettings(budget=budget, popsize=4, seed=7, **settings)


# --- what the command prints: Ctrl-C, test scores, notes, log lines -------------------


class _InterruptAt:
    """An objective that raises KeyboardInterrupt at call number ``stop_at``."""

    def __init__(self, objective, stop_at: int):
        self.objective, self.stop_at, self.calls = objective, stop_at, 0
        self.maximize, self.name = objective.maximize, objective.name

    def __call__(self, model, tokenizer):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.objective(model, tokenizer)


def test_ctrl_c_while_searching_is_one_line_and_the_rerun_resumes(
    config, val, tmp_path, monkeypatch
):
    from mergekit_pcb.tune.objective_options import ObjectiveOptions

    build = ObjectiveOptions.build
    monkeypatch.setattr(
        ObjectiveOptions, "build", lambda self: (_InterruptAt(build(self)[0], 4), None)
    )
    out = tmp_path / "out"
    args = [config, str(out), "--val", val, "--budget", "6", "--popsize", "4", "--no-scale-search"]
    stopped = CliRunner().invoke(main, [*args, "--quiet"])
    assert stopped.exit_code == 130
    assert _lines(stopped) == [
        f"Interrupted: 3 evaluations kept in {out / HISTORY_FILE}; run the same command again "
        "to resume from them."
    ]
    monkeypatch.setattr(ObjectiveOptions, "build", build)
    again = CliRunner().invoke(main, [*args, "--quiet"])
    assert again.exit_code == 0, again.output
    assert "over 5 evaluations (3 of them resumed from history.jsonl)" in again.output


def test_ctrl_c_with_densities_counts_every_densitys_history(config, val, tmp_path, monkeypatch):
    from mergekit_pcb.tune.objective_options import ObjectiveOptions

    build = ObjectiveOptions.build
    monkeypatch.setattr(
        ObjectiveOptions, "build", lambda self: (_InterruptAt(build(self)[0], 8), None)
    )
    out = tmp_path / "out"
    args = [config, str(out), "--val", val, "--budget", "10", "--popsize", "4"]
    args += ["--no-scale-search", "--densities", "0.2,0.4", "--quiet"]
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == 130
    # 5 at density 0.2 (the start and one generation), 2 at 0.4 before the Ctrl-C
    assert _lines(stopped) == [
        f"Interrupted: 7 evaluations kept in {out / 'density-*' / HISTORY_FILE}; run the same "
        "command again to resume from them."
    ]
    counted = []
    monkeypatch.setattr(
        ObjectiveOptions,
        "build",
        lambda self: (counted.append(_InterruptAt(build(self)[0], -1)) or counted[0], None),
    )
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert counted[0].calls == 3  # only what the Ctrl-C cut short at density 0.4
    lines = _lines(again)
    for line, density in zip(lines, ("0.2", "0.4"), strict=False):
        assert line.startswith(f"density {density}   best score")
        assert line.endswith("over 5 evaluations")


def test_ctrl_c_while_starting_up_is_one_line(config, val, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "load_model", interrupted)
    result = CliRunner().invoke(main, [config, str(tmp_path / "out"), "--val", val, "--quiet"])
    assert result.exit_code == 130
    assert _lines(result) == ["Interrupted before any evaluation finished; nothing to resume."]


def test_test_scores_are_printed(config, val, tmp_path):
    out, test = tmp_path / "out", tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "2 apples"}) + "\n")
    args = [config, str(out), "--val", val, "--test", str(test), "--budget", "5"]
    result = CliRunner().invoke(main, [*args, "--popsize", "4", "--no-scale-search", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for label in ("start", "best"):
        line = next(x for x in _lines(result) if x.strip().startswith(f"{label} "))
        assert f" test {summary[label]['test_score']!s} " in line, line


def test_the_bound_note_is_printed_once(config, tmp_path):
    from mergekit_pcb.tune.search import BoundHit

    # A flat objective: nothing beats the start, which sits on the upper bound.
    objective = tmp_path / "flat.py"
    objective.write_text("def score(model, tokenizer):\n    return 0.0\n")
    out = tmp_path / "out"
    args = [config, str(out), "--objective", "function", "--function", f"{objective}:score"]
    options = ["--maximize", "--lower", "0.5", "--upper", "1.0", "--start", "1.0"]
    result = CliRunner().invoke(main, [*args, *options, "--budget", "5", "--popsize", "4"])
    assert result.exit_code == 0, result.output
    hits = json.loads((out / "summary.json").read_text())["on_bound"]
    assert len(hits) == 3  # each model's weight
    for hit in hits:
        assert result.output.count(BoundHit(**hit).message()) == 1, result.output


def test_log_lines_read_warning_not_the_logger_name(tiny_models, val, tmp_path):
    config = write_config(
        str(tmp_path / "pcb.yml"), tiny_models, per_model={"math": {"desnity": 0.1}}
    )
    args = [config, str(tmp_path / "out"), "--val", val, "--budget", "5", "--popsize", "4"]
    result = CliRunner().invoke(main, [*args, "--no-scale-search", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [x for x in _lines(result) if "desnity" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.output
    assert "WARNING:" not in result.output


@pytest.mark.parametrize("plan", ["plan_tensor_tasks", "plan_saved_tensors"])
def test_the_capture_prints_no_deprecation_notice(tune_config, caplog, plan):
    """mergekit's output config sets ``torch_dtype``, which transformers logs as
    deprecated, once per process: the capture's plan (and the Evolver's,
    ``plan_saved_tensors``) must not show it."""
    from mergekit.options import MergeOptions
    from transformers.utils import logging as transformers_logging

    from mergekit_pcb import _mergekit_compat as compat
    from mergekit_pcb.merge import read_config

    warning_once = logging.Logger.warning_once  # transformers' lru-cached method
    warning_once.cache_clear()
    transformers_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        assert getattr(compat, plan)(read_config(tune_config).merge_config, MergeOptions())
    assert "deprecated" not in caplog.text


def test_a_base_without_tokenizer_files_is_one_line_naming_the_folder(tiny_models, val, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_models["base"], base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    config = write_config(str(tmp_path / "pcb.yml"), {**tiny_models, "base": str(base)})
    result = CliRunner().invoke(main, [config, str(tmp_path / "out"), "--val", val, "--quiet"])
    assert result.exit_code == 1
    (line,) = _lines(result)
    assert line.startswith(f"Error: {base}: no tokenizer could be loaded from the base model's")
    assert line.endswith(
        "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
    )
