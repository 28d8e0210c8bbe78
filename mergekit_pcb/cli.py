"""``mergekit-pcb``: ``mergekit-yaml`` with ``pcb`` registered, config checks, safe output.

Same arguments and options as ``mergekit-yaml``. On top of it:

* ``pcb`` is registered in-process, whether or not the start-up hook is installed;
* the config is checked first (missing base model, density or clamp ratio out of
  range, misspelt ``pcb`` parameter keys, which mergekit would silently ignore);
* the merge is written to a staging folder beside OUT_PATH and moved into place
  only when it succeeded, so a failed merge leaves OUT_PATH as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_pcb  # noqa: F401  (registers ``pcb``)
from mergekit_pcb.config_check import check_pcb_config

LOG = logging.getLogger(__name__)


def load_config(config_file: str) -> tuple[MergeConfiguration, str]:
    """Read, check and parse a mergekit YAML config; return it with its source text."""
    with open(config_file, encoding="utf-8") as file:
        source = file.read()
    raw = yaml.safe_load(source)
    if not isinstance(raw, dict):
        raise click.ClickException(f"{config_file}: not a mergekit YAML config (a mapping)")
    try:
        check_pcb_config(raw)
    except ValueError as error:
        raise click.ClickException(f"{config_file}: {error}") from None
    return MergeConfiguration.model_validate(raw), source


def merge_into(
    merge_config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    config_source: str | None = None,
) -> None:
    """Run the merge into a staging folder, then move it into ``out_path``."""
    out_path = os.path.abspath(out_path)
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    staging_root = tempfile.mkdtemp(prefix=".mergekit-pcb-", dir=parent)
    # Same base name as OUT_PATH: mergekit names the model card after it.
    staged = os.path.join(staging_root, os.path.basename(out_path))
    try:
        run_merge(merge_config, staged, options=options, config_source=config_source)
        if not os.path.isdir(out_path):
            os.replace(staged, out_path)
        else:
            for name in os.listdir(staged):
                target = os.path.join(out_path, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staged, name), target)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


@click.command("mergekit-pcb", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
    """Merge the models in CONFIG_FILE into OUT_PATH (mergekit-yaml with `pcb`)."""
    merge_options.apply_global_options()
    merge_config, source = load_config(config_file)
    try:
        merge_into(merge_config, out_path, merge_options, config_source=source)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(f"merge failed, {out_path} left unchanged: {error}") from error
    LOG.info("Merged model written to %s", out_path)


if __name__ == "__main__":
    main()
