"""What answers before torch and mergekit are imported: ``mergekit-pcb --help``,
``--version``, the config errors that need no mergekit, ``import mergekit_pcb``; and that
the command's own declaration of mergekit's options is mergekit's, option for option."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from typing import Any

import click
import pytest
from click.testing import CliRunner

import mergekit_pcb
from mergekit_pcb import cli, merge_options, names
from mergekit_pcb.config_check import _raw_reference_paths, check_raw_model_paths
from mergekit_pcb.errors import ConfigError
from tests.conftest import write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "mergekit", "transformers", "cma")

#: Runs a command in-process with the given arguments; at exit (click exits) it
#: writes to stderr which heavy modules were imported by then.
_COMMAND = f"""
import atexit, importlib, json, sys
atexit.register(lambda: print("HEAVY " + json.dumps(
    sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr))
module, prog = sys.argv[1:3]
importlib.import_module(module).main(sys.argv[3:], prog_name=prog)
"""


def _command(
    args: list[str], module: str = "mergekit_pcb.cli", prog: str = "mergekit-pcb"
) -> tuple[int, str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND, module, prog, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    heavy_line = [line for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    assert heavy_line, done.stderr[-2000:]
    return done.returncode, done.stdout + done.stderr, json.loads(heavy_line[-1][6:])


def test_help_names_the_arguments_and_mergekits_options_without_torch():
    code, output, heavy = _command(["--help"])
    assert code == 0, output
    assert heavy == []
    assert "CONFIG_FILE  a mergekit YAML config" in output
    assert "OUT_PATH     the folder for the merged model" in output
    for option in ("--debug", "--version", "--out-shard-size", "--cuda / --no-cuda", "-j,"):
        assert option in output


def test_version_names_both_packages_without_torch():
    code, output, heavy = _command(["--version"])
    assert (code, heavy) == (0, [])
    expected = f"mergekit-pcb {mergekit_pcb.__version__} (mergekit {metadata.version('mergekit')})"
    assert output.strip().splitlines()[0] == expected


def test_config_errors_that_need_no_mergekit_answer_without_torch(tmp_path):
    syntax = tmp_path / "syntax.yml"
    syntax.write_text("merge_method: pcb\nbase_model: [unclosed\n")
    code, output, heavy = _command([str(syntax), str(tmp_path / "out")])
    assert (code, heavy) == (1, [])
    assert f"Error: {syntax}: line 3, column 1: not valid YAML" in output

    # A misspelt key is a warning (the merge would go on); the missing model ends it.
    missing = tmp_path / "missing.yml"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    gone = tmp_path / "gone" / "model"
    missing.write_text(
        f"merge_method: pcb\nbase_model: {base}\n"
        f"models:\n  - model: {gone}\n    parameters: {{desnity: 0.3}}\n"
    )
    code, output, heavy = _command([str(missing), str(tmp_path / "out")])
    assert (code, heavy) == (1, [])
    assert "unknown pcb parameter 'desnity' is ignored by mergekit; did you mean 'density'?" in (
        output
    )
    assert f"Error: {missing}: model {gone}: no such folder, and not a Hugging Face repo id" in (
        output
    )
    assert not (tmp_path / "out").exists()


def test_the_tuner_answers_help_version_and_config_errors_without_torch(tmp_path):
    tuner = {"module": "mergekit_pcb.tune.cli", "prog": "mergekit-pcb-tune"}
    code, output, heavy = _command(["--help"], **tuner)
    assert (code, heavy) == (0, []), output
    for text in ("CONFIG_FILE", "resume", "history.jsonl", "best.yml", "path/to/file.py:function"):
        assert text in output
    code, output, heavy = _command(["--version"], **tuner)
    assert (code, heavy) == (0, [])
    assert output.startswith(f"mergekit-pcb {mergekit_pcb.__version__} (mergekit ")

    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a"}\n')
    syntax = tmp_path / "syntax.yml"
    syntax.write_text("merge_method: pcb\nbase_model: [unclosed\n")
    code, output, heavy = _command([str(syntax), str(tmp_path / "out"), "--val", str(val)], **tuner)
    assert (code, heavy) == (1, [])
    assert f"Error: {syntax}: line 3, column 1: not valid YAML" in output
    assert not (tmp_path / "out").exists()


def test_the_evolver_answers_help_version_and_bad_settings_without_torch(tmp_path):
    evolver = {"module": "mergekit_pcb.evolve.cli", "prog": "mergekit-pcb-evolve"}
    code, output, heavy = _command(["--help"], **evolver)
    assert (code, heavy) == (0, []), output
    for text in ("CONFIG_FILE", "resume", "history.jsonl", "best.yml", "population/<name>/"):
        assert text in output
    code, output, heavy = _command(["--version"], **evolver)
    assert (code, heavy) == (0, [])
    assert output.startswith(f"mergekit-pcb {mergekit_pcb.__version__} (mergekit ")

    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a"}\n')
    syntax = tmp_path / "syntax.yml"
    syntax.write_text("merge_method: pcb\nbase_model: [unclosed\n")
    args = [str(syntax), str(tmp_path / "out"), "--val", str(val)]
    code, output, heavy = _command(args, **evolver)
    assert (code, heavy) == (1, [])
    assert f"Error: {syntax}: line 3, column 1: not valid YAML" in output
    code, output, heavy = _command([*args, "--cr", "0"], **evolver)
    assert (code, heavy) == (1, [])
    assert "Error: --cr must be in (0, 1], got 0.0" in output
    assert not (tmp_path / "out").exists()


# --- import mergekit_pcb -------------------------------------------------------------

_SITE = sysconfig.get_paths()["purelib"]


def _wheel_layout(folder) -> str:
    """The package as a built wheel lays it out: the start-up module at the top of
    site-packages, no ``mergekit_pcb/_hook`` (hatch moves it); return the folder."""
    shutil.copytree(
        os.path.join(REPO, "mergekit_pcb"),
        os.path.join(folder, "mergekit_pcb"),
        ignore=shutil.ignore_patterns("_hook", "__pycache__"),
    )
    shutil.copy(os.path.join(REPO, "mergekit_pcb", "_hook", "_mergekit_pcb_startup.py"), folder)
    return str(folder)


def _python(code: str, layout: str, folder) -> str:
    """Run ``code`` with the package laid out as ``layout``: ``installed`` (this
    environment, whose start-up file installs the hook), ``checkout`` (the repository
    on ``PYTHONPATH``, no start-up file: ``-S``, no ``site``) or ``wheel`` (a wheel's
    files on ``PYTHONPATH``, no start-up file)."""
    if layout == "installed":
        command, env = [sys.executable, "-c", code], None
    else:
        first = REPO if layout == "checkout" else _wheel_layout(folder)
        command = [sys.executable, "-S", "-c", code]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([first, _SITE])}
    # Not run from the repository root, where the checkout would come first on sys.path.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("layout", ["installed", "checkout", "wheel"])
def test_import_is_cheap_and_pcb_is_registered_once_mergekit_merges(layout, tmp_path):
    code = (
        "import sys\n"
        "import mergekit_pcb\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(sum(bool(getattr(f, 'registers_mergekit_pcb', False)) for f in sys.meta_path))\n"
        "from mergekit import merge_methods\n"
        "print(type(merge_methods.get('pcb')).__name__)\n"
        "print(sum(bool(getattr(f, 'registers_mergekit_pcb', False)) for f in sys.meta_path))\n"
        "print(mergekit_pcb.__file__)\n"
    )
    lines = _python(code, layout, tmp_path).split("\n")
    assert lines[:4] == ["[]", "1", "PCBMerge", "0"]
    expected_home = tmp_path if layout == "wheel" else REPO
    assert lines[4].startswith(str(expected_home))


def test_import_after_mergekit_registers_at_once(tmp_path):
    code = (
        "import sys\n"
        "from mergekit import merge_methods\n"
        "import mergekit_pcb\n"
        "print(type(merge_methods.get('pcb')).__name__)\n"
    )
    assert _python(code, "checkout", tmp_path).split() == ["PCBMerge"]


#: The package's modules that import mergekit at their top: whichever a program imports
#: first, mergekit's merge methods get imported while that module is half initialised.
MERGEKIT_IMPORTERS = [
    "mergekit_pcb.method",
    "mergekit_pcb.method_scope",
    "mergekit_pcb._mergekit_compat",
    "mergekit_pcb.merge",
    "mergekit_pcb.tune.capture",
    "mergekit_pcb.tune.job",
    "mergekit_pcb.evolve.population_merge",
    "mergekit_pcb.evolve.job",
]


@pytest.mark.slow
@pytest.mark.parametrize("module", MERGEKIT_IMPORTERS)
@pytest.mark.parametrize("layout", ["installed", "checkout"])
def test_pcb_is_registered_whichever_module_is_imported_first(layout, module, tmp_path):
    code = (
        f"import {module}\n"
        "from mergekit import merge_methods\n"
        "print(type(merge_methods.get('pcb')).__name__)\n"
    )
    if layout == "checkout":  # no start-up file: the package's own hook
        code = "import mergekit_pcb\n" + code
    assert _python(code, layout, tmp_path).split() == ["PCBMerge"]


def test_public_names_load_on_first_use():
    from mergekit_pcb import method, pcb

    assert mergekit_pcb.pcb_merge is pcb.pcb_merge
    assert mergekit_pcb.pcb_contributions is pcb.pcb_contributions
    assert mergekit_pcb.PCBOptions is pcb.PCBOptions
    assert mergekit_pcb.PCBMerge is method.PCBMerge
    assert mergekit_pcb.register is method.register
    assert mergekit_pcb.METHOD_NAME == "pcb"
    assert set(mergekit_pcb.__all__) <= set(dir(mergekit_pcb))
    for name in mergekit_pcb.__all__:
        assert getattr(mergekit_pcb, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'pcb_mrege'"):
        _ = mergekit_pcb.pcb_mrege


def test_light_names_match_the_methods_spec():
    from mergekit_pcb.method import PARAMETER_NAMES, PCB_SPEC

    assert names.METHOD_NAME == PCB_SPEC.name
    assert names.PARAMETER_NAMES == frozenset(p.name for p in PCB_SPEC.parameters)
    assert names.PARAMETER_NAMES == PARAMETER_NAMES


# --- mergekit's options, declared without mergekit -----------------------------------


def _mergekit_params() -> list[click.Parameter]:
    from mergekit.options import add_merge_options

    decorated = add_merge_options(lambda **kwargs: None)
    return list(reversed(decorated.__click_params__))


def _own_merge_params() -> list[click.Parameter]:
    fields = {option.name for option in merge_options.MERGE_OPTIONS}
    return [param for param in cli.main.params if param.name in fields]


def _describe(param: click.Parameter) -> dict[str, Any]:
    assert isinstance(param, click.Option)
    return {
        "name": param.name,
        "opts": param.opts,
        "secondary_opts": param.secondary_opts,
        "type": param.type.name,
        "default": param.default,
        "help": param.help,
        "show_default": param.show_default,
        "count": param.count,
        "is_flag": param.is_flag,
        "flag_value": param.flag_value,
        "multiple": param.multiple,
        "required": param.required,
    }


def test_every_mergekit_option_is_declared_as_mergekit_declares_it():
    from mergekit.options import OPTION_CATEGORIES, MergeOptions

    theirs = _mergekit_params()
    ours = _own_merge_params()
    assert [_describe(p) for p in ours] == [_describe(p) for p in theirs]
    assert [p.name for p in theirs] == list(MergeOptions.model_fields)
    assert {o.name: o.section for o in merge_options.MERGE_OPTIONS} == OPTION_CATEGORIES


def test_help_text_is_mergekits_help_text():
    """The whole --help, against the same command built with mergekit's own decorator
    and help class."""
    from mergekit.options import PrettyPrintHelp

    fields = {option.name for option in merge_options.MERGE_OPTIONS}
    own_params = [param for param in cli.main.params if param.name not in fields]
    reference = PrettyPrintHelp(
        name=cli.main.name, params=own_params + _mergekit_params(), help=cli.main.help
    )
    ours = CliRunner().invoke(cli.main, ["--help"], prog_name="mergekit-pcb")
    theirs = CliRunner().invoke(reference, ["--help"], prog_name="mergekit-pcb")
    assert ours.exit_code == theirs.exit_code == 0
    assert ours.output == theirs.output


#: Every mergekit option away from its default (checked below).
EVERY_OPTION = [
    "--allow-crimes",
    "--unsafe-truncate-embeddings",
    "--transformers-cache=/tmp/transformers-cache",
    "--lora-merge-cache=/tmp/lora-cache",
    "--lora-merge-dtype=float16",
    "--cuda",
    "--device=cuda:1",
    "--low-cpu-memory",
    "--out-shard-size=500M",
    "--no-copy-tokenizer",
    "--clone-tensors",
    "--trust-remote-code",
    "--random-seed=7",
    "--lazy-unpickle",
    "--no-write-model-card",
    "--no-safe-serialization",
    "-vv",
    "--quiet",
    "--read-to-gpu",
    "--multi-gpu",
    "-j",
    "3",
    "--gpu-rich",
    "--async-write",
    "--write-threads=2",
]


class _Parsed(Exception):
    """Stops the command once its MergeOptions are built."""


@pytest.mark.parametrize(
    "options", [[], EVERY_OPTION, ["--out-shard-size", "2k", "--num-threads", "1", "-v"]]
)
def test_options_reach_mergekit_as_mergekits_own_command_passes_them(
    options, tiny_models, tmp_path, monkeypatch
):
    from mergekit.options import MergeOptions, add_merge_options

    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    theirs: list[MergeOptions] = []

    @click.command()
    @click.argument("config_file")
    @click.argument("out_path")
    @add_merge_options
    def reference(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
        theirs.append(merge_options)

    ours: list[MergeOptions] = []

    def capture(values):
        ours.append(merge_options.merge_options(values))
        raise _Parsed

    monkeypatch.setattr(cli, "merge_options", capture)
    args = [config, str(tmp_path / "out"), *options]
    assert CliRunner().invoke(reference, args).exit_code == 0
    result = CliRunner().invoke(cli.main, args)
    assert isinstance(result.exception, _Parsed), result.output
    assert ours == theirs
    if options is EVERY_OPTION:
        default = MergeOptions()
        unchanged = [
            f for f in MergeOptions.model_fields if getattr(ours[0], f) == getattr(default, f)
        ]
        assert unchanged == []


def test_a_bad_shard_size_is_one_usage_error(tiny_models, tmp_path):
    config = write_config(str(tmp_path / "pcb.yml"), tiny_models)
    result = CliRunner().invoke(cli.main, [config, str(tmp_path / "o"), "--out-shard-size", "5X"])
    assert result.exit_code == 2
    assert "'5X' is not a parameter count such as 5B, 500M or 1000" in result.output


# --- model paths read from the raw config ---------------------------------------------


@pytest.mark.parametrize(
    "reference",
    [
        "org/model",
        "org/model@v2",
        "base+adapter",
        "org/model@main+org/lora@r1",
        {"model": "org/model", "lora": "org/lora"},
        {"model": {"path": "org/model", "revision": "r"}},
        {"model": "m", "override_architecture": "LlamaForCausalLM"},
    ],
)
def test_raw_references_read_as_mergekit_parses_them(reference):
    from mergekit.common import ModelReference

    parsed = ModelReference.model_validate(reference)
    expected = (parsed.model.path, parsed.lora.path if parsed.lora else None)
    assert _raw_reference_paths(reference) == expected


def _all_references(tmp_path) -> dict[str, dict]:
    """Configs naming models in every place mergekit looks, each a missing folder."""
    names = iter(f"{tmp_path}/m{i}" for i in range(20))
    source = lambda: {"model": next(names), "layer_range": [0, 2]}  # noqa: E731
    return {
        "models": {
            "merge_method": "pcb",
            "base_model": next(names),
            "models": [{"model": next(names)}, {"model": f"{next(names)}+{next(names)}"}],
        },
        "slices": {
            "merge_method": "pcb",
            "base_model": next(names),
            "slices": [{"sources": [source(), source()]}],
        },
        "modules": {
            "merge_method": "pcb",
            "base_model": next(names),
            "modules": {
                "a": {"models": [{"model": next(names)}]},
                "b": {"slices": [{"sources": [source()]}]},
            },
        },
    }


@pytest.mark.parametrize("layout", ["models", "slices", "modules"])
def test_raw_walk_checks_every_model_mergekit_references(layout, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration

    from mergekit_pcb import config_check

    raw = _all_references(tmp_path)[layout]
    expected = set()
    for reference in MergeConfiguration.model_validate(raw).referenced_models():
        expected.add((reference.model.path, reference.lora.path if reference.lora else None))
    seen: list[tuple[str, str | None]] = []
    monkeypatch.setattr(config_check, "_check_references", lambda refs: seen.extend(refs))
    check_raw_model_paths(raw)
    assert set(seen) == expected
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="no such folder"):
        check_raw_model_paths(raw)
