"""``mergekit-pcb``: ``mergekit-yaml`` with ``pcb`` registered, config checks, safe output.

Same arguments and options as ``mergekit-yaml``, plus ``--debug``. On top of it:

* ``pcb`` is registered in-process, whether or not the start-up hook is installed;
* the config is checked first (YAML syntax, mergekit's schema, model paths that do
  not exist, missing base model, ``pcb`` parameter values the method would refuse,
  misspelt ``pcb`` parameter keys, which mergekit would silently ignore, and negative
  weights, which are allowed but said);
* the merge is written to a staging folder beside OUT_PATH and moved into place
  only when it succeeded, so a failed merge leaves OUT_PATH as it was; the weight
  shards of an earlier merge that the new one does not overwrite are removed then;
* a bad input is reported as one ``Error:`` line (``--debug``: with the traceback).

The work is :mod:`mergekit_pcb.merge`'s; this module parses options and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options
from pydantic import ValidationError

from mergekit_pcb.errors import describe_validation_error
from mergekit_pcb.merge import merge_into, read_config

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


@click.command("mergekit-pcb", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str, debug: bool) -> None:
    """Merge the models in CONFIG_FILE into OUT_PATH (mergekit-yaml with `pcb`)."""
    merge_options.apply_global_options()
    with reported_errors(debug):
        loaded = read_config(config_file)
    with reported_errors(debug, prefix=f"merge failed, {out_path} left unchanged: "):
        merge_into(loaded.merge_config, out_path, merge_options, config_source=loaded.source)
    LOG.info("Merged model written to %s", out_path)


if __name__ == "__main__":
    main()
