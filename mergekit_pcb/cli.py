"""``mergekit-pcb``: ``mergekit-yaml`` with ``pcb`` registered, config checks, safe output.

Same arguments and options as ``mergekit-yaml``, plus ``--debug`` and ``--version``.
On top of it:

* ``pcb`` is registered in-process, whether or not the start-up hook is installed;
* the config is checked first (YAML syntax, mergekit's schema, model paths that do
  not exist, missing base model, ``pcb`` parameter values the method would refuse,
  misspelt ``pcb`` parameter keys, which mergekit would silently ignore, and negative
  weights, which are allowed but said);
* the merge is written to a staging folder beside OUT_PATH and moved into place
  only when it succeeded, so a failed merge leaves OUT_PATH as it was; the weight
  shards of an earlier merge that the new one does not overwrite are removed then;
  a second merge into an OUT_PATH that a running one is writing is refused;
* a bad input is reported as one ``Error:`` line (``--debug``: with the traceback);
* ``--help``, ``--version`` and the config errors that need no mergekit (a YAML syntax
  error, a model path that does not exist, a missing base model; misspelt keys are
  warned about) answer before torch and mergekit are imported: this module imports
  neither at module level, and mergekit's options are declared in
  :mod:`mergekit_pcb.merge_options`.

The work is :mod:`mergekit_pcb.merge`'s; this module parses options and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import click

from mergekit_pcb import __version__
from mergekit_pcb.config_check import read_raw_config
from mergekit_pcb.errors import describe_validation_error
from mergekit_pcb.merge_options import (
    SectionedHelp,
    add_merge_options,
    configure_logging,
    merge_options,
)

LOG = logging.getLogger(__name__)

#: What a bad config, checkpoint, data file or option ends in: library code raises
#: ``ValueError`` (``ConfigError``, ``MergeInputError``); mergekit, transformers and
#: the Hub client raise ``RuntimeError`` and ``OSError``; a missing optional extra or
#: a user's objective module, ``ImportError``.
USER_ERRORS = (ValueError, RuntimeError, OSError, ImportError)

DEBUG_HELP = "on an error, show the whole traceback instead of one line"


def one_line(error: BaseException) -> str:
    """``error`` as one line: pydantic's field list joined; a message that carries a
    traceback (the tuner's "every candidate failed") cut to its first and last line."""
    from pydantic import ValidationError  # here: the commands start without pydantic

    if isinstance(error, ValidationError):
        return describe_validation_error(error)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


@contextmanager
def reported_errors(debug: bool, prefix: str = "") -> Iterator[None]:
    """Turn :data:`USER_ERRORS` into click's one ``Error:`` line (exit status 1).

    With ``debug`` the error goes on as raised, so Python prints its traceback.
    """
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        raise click.ClickException(prefix + one_line(error)) from None


def version_text() -> str:
    """``mergekit-pcb 0.1.0 (mergekit 0.1.5)``: both versions, for a bug report."""
    try:
        mergekit = f"mergekit {metadata.version('mergekit')}"
    except metadata.PackageNotFoundError:
        mergekit = "mergekit not installed"
    return f"mergekit-pcb {__version__} ({mergekit})"


def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


#: ``--version`` of every command: both versions, then exit.
version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Show the versions of mergekit-pcb and mergekit, and exit.",
)


@click.command("mergekit-pcb", cls=SectionedHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@version_option
@add_merge_options
def main(merge_values: dict[str, Any], config_file: str, out_path: str, debug: bool) -> None:
    """Merge the models in CONFIG_FILE into OUT_PATH: mergekit-yaml, with `pcb` known.

    \b
    CONFIG_FILE  a mergekit YAML config (merge_method: pcb, or any mergekit method)
    OUT_PATH     the folder for the merged model, created if missing; its files are
                 replaced only once the whole merge has succeeded

    The config is checked before any model is loaded: YAML syntax, model paths,
    misspelt pcb parameter keys, pcb values and mergekit's schema. The options below
    are mergekit-yaml's, plus --debug and --version.
    """
    configure_logging(merge_values["verbosity"])
    with reported_errors(debug):
        raw_config = read_raw_config(config_file)
        # The rest needs mergekit, torch and transformers: seconds of imports, paid only
        # once the checks above have passed.
        from mergekit_pcb.merge import merge_into, parse_config

        options = merge_options(merge_values)
        options.apply_global_options()
        loaded = parse_config(raw_config)
    with reported_errors(debug, prefix=f"merge failed, {out_path} left unchanged: "):
        merge_into(loaded.merge_config, out_path, options, config_source=loaded.source)
    LOG.info("Merged model written to %s", out_path)


if __name__ == "__main__":
    main()
