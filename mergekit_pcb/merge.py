"""Read a checked mergekit config and merge it into an output folder without half-writes.

The library side of ``mergekit-pcb`` (and of the tuner's ``--write-model``):
:func:`read_config` reads, checks and parses a YAML config once (:func:`parse_config`
finishes what :func:`~mergekit_pcb.config_check.read_raw_config` began);
:func:`merge_into` runs mergekit's ``run_merge`` into a staging folder beside the
output and moves the result into place only when it succeeded, so a failed merge
leaves the output folder as it was; the weight files of an earlier merge that the new
one does not overwrite are removed then, so that no loader reads a mix of both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import ValidationError

import mergekit_pcb.method  # noqa: F401  (registers ``pcb``)
from mergekit_pcb.config_check import (
    RawConfig,
    check_model_paths,
    check_pcb_values,
    log_warnings,
    read_raw_config,
)
from mergekit_pcb.errors import ConfigError, describe_validation_error
from mergekit_pcb.folder_lock import folder_lock
from mergekit_pcb.model_card import add_plugin_note

LOG = logging.getLogger(__name__)

#: The weight files mergekit's ``TensorWriter`` (mergekit/io/tensor_writer.py) writes
#: for a merge: ``model.safetensors`` alone, or ``model-00001-of-00003.safetensors``...
#: with ``model.safetensors.index.json``; ``pytorch_model`` and ``.bin`` with
#: ``--no-safe-serialization``. ``model-1.safetensors`` is a shard's name before the
#: writer's ``finalize()`` renames it, left by a merge that was cut short.
_WEIGHT_FILE = re.compile(
    r"model(-\d+|-\d{5,}-of-\d{5,})?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+|-\d{5,}-of-\d{5,})?\.bin|pytorch_model\.bin\.index\.json"
)


@dataclass(frozen=True)
class LoadedConfig:
    """A config file as read: its text, the YAML mapping, and mergekit's parsed form."""

    path: str
    source: str
    raw: dict[str, Any]
    merge_config: MergeConfiguration


def read_config(config_file: str) -> LoadedConfig:
    """Read, check and parse a mergekit YAML config; raise :class:`ConfigError` if bad.

    Every message starts with the file's name and says where in it the problem is
    (the line of a YAML syntax error, the model and the key of a bad value, the field
    that mergekit's schema refuses, the model path that does not exist).
    """
    return parse_config(read_raw_config(config_file))


def parse_config(raw_config: RawConfig) -> LoadedConfig:
    """The checks of :func:`read_config` that need mergekit, on a config that
    :func:`~mergekit_pcb.config_check.read_raw_config` has read and checked: the ``pcb``
    values (by the method's own spec), mergekit's schema, the parsed model paths."""
    config_file, raw = raw_config.path, raw_config.raw
    try:
        log_warnings(check_pcb_values(raw))
    except ValueError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    try:
        merge_config = MergeConfiguration.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{config_file}: {describe_validation_error(error)}") from None
    except RuntimeError as error:  # mergekit's own parsers raise it (a path with two '@')
        raise ConfigError(f"{config_file}: {error}") from None
    try:
        check_model_paths(merge_config)
    except ValueError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    return LoadedConfig(config_file, raw_config.source, raw, merge_config)


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
    """Run the merge into a staging folder, then move it into ``out_path``.

    ``out_path`` is locked meanwhile (:mod:`mergekit_pcb.folder_lock`): a second merge
    into it is refused at once. A failed merge leaves it as it was (not there, if it
    was not).

    Files of ``out_path`` that the merge does not write are kept, except the weight
    shards and shard index of an earlier merge (mergekit's names only): left beside
    the new ones, a loader could read a mix of both merges. What is removed is logged.
    The model card of a ``pcb`` merge says that reproducing it needs this plugin
    (:mod:`mergekit_pcb.model_card`).
    """
    out_path = os.path.abspath(out_path)
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise ConfigError(f"{out_path}: exists and is not a folder")
    created = not os.path.exists(out_path)
    os.makedirs(out_path, exist_ok=True)  # the folder is what the lock holds
    try:
        with folder_lock(
            out_path,
            f"{out_path} is being written by another merge that is still running; wait for "
            "it to end, or use another output folder",
        ):
            _staged_merge(merge_config, out_path, options, config_source)
    except BaseException:
        if created and not os.listdir(out_path):
            os.rmdir(out_path)
        raise


def _staged_merge(
    merge_config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    config_source: str | None,
) -> None:
    staging_root = tempfile.mkdtemp(prefix=".mergekit-pcb-", dir=os.path.dirname(out_path))
    # Same base name as OUT_PATH: mergekit names the model card after it.
    staged = os.path.join(staging_root, os.path.basename(out_path))
    try:
        run_merge(merge_config, staged, options=options, config_source=config_source)
        add_plugin_note(staged, merge_config.merge_method)
        written = set(os.listdir(staged))
        for name in written:
            target = os.path.join(out_path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staged, name), target)
        remove_stale_weights(out_path, keep=written)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def remove_stale_weights(out_path: str, keep: set[str]) -> list[str]:
    """Remove mergekit-named weight files of ``out_path`` not in ``keep``; return them."""
    stale = sorted(
        name
        for name in os.listdir(out_path)
        if name not in keep
        and _WEIGHT_FILE.fullmatch(name)
        and not os.path.isdir(os.path.join(out_path, name))
    )
    for name in stale:
        os.remove(os.path.join(out_path, name))
    if stale:
        LOG.warning(
            "%s: removed %d weight file(s) of the earlier merge that the new one does not "
            "replace: %s",
            out_path,
            len(stale),
            ", ".join(stale),
        )
    return stale
