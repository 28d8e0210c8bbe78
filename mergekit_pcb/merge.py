"""Read a checked mergekit config and merge it into an output folder without half-writes.

The library side of ``mergekit-pcb`` (and of the tuner's ``--write-model``):
:func:`read_config` reads, checks and parses a YAML config once;
:func:`merge_into` runs mergekit's ``run_merge`` into a staging folder beside the
output and moves the result into place only when it succeeded, so a failed merge
leaves the output folder as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

import mergekit_pcb.method  # noqa: F401  (registers ``pcb``)
from mergekit_pcb.config_check import check_pcb_config
from mergekit_pcb.errors import ConfigError


@dataclass(frozen=True)
class LoadedConfig:
    """A config file as read: its text, the YAML mapping, and mergekit's parsed form."""

    path: str
    source: str
    raw: dict[str, Any]
    merge_config: MergeConfiguration


def read_config(config_file: str) -> LoadedConfig:
    """Read, check and parse a mergekit YAML config; raise :class:`ConfigError` if bad."""
    with open(config_file, encoding="utf-8") as file:
        source = file.read()
    raw = yaml.safe_load(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: not a mergekit YAML config (a mapping)")
    try:
        check_pcb_config(raw)
    except ValueError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    return LoadedConfig(config_file, source, raw, MergeConfiguration.model_validate(raw))


def load_config(config_file: str) -> tuple[MergeConfiguration, str]:
    """:func:`read_config`'s parsed config and source text, for callers needing no more."""
    loaded = read_config(config_file)
    return loaded.merge_config, loaded.source


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
