"""``mergekit-pcb``: ``mergekit-yaml`` with ``pcb`` registered, config checks, safe output.

Same arguments and options as ``mergekit-yaml``. On top of it:

* ``pcb`` is registered in-process, whether or not the start-up hook is installed;
* the config is checked first (missing base model, density or clamp ratio out of
  range, misspelt ``pcb`` parameter keys, which mergekit would silently ignore);
* the merge is written to a staging folder beside OUT_PATH and moved into place
  only when it succeeded, so a failed merge leaves OUT_PATH as it was.

The work is :mod:`mergekit_pcb.merge`'s; this module parses options and reports.
"""

from __future__ import annotations

import logging

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_pcb.errors import ConfigError
from mergekit_pcb.merge import merge_into, read_config

LOG = logging.getLogger(__name__)


@click.command("mergekit-pcb", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
    """Merge the models in CONFIG_FILE into OUT_PATH (mergekit-yaml with `pcb`)."""
    merge_options.apply_global_options()
    try:
        loaded = read_config(config_file)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    try:
        merge_into(loaded.merge_config, out_path, merge_options, config_source=loaded.source)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(f"merge failed, {out_path} left unchanged: {error}") from error
    LOG.info("Merged model written to %s", out_path)


if __name__ == "__main__":
    main()
