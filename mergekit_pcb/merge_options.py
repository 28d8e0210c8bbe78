"""mergekit's merge options (those of ``mergekit-yaml``), declared without importing mergekit.

``mergekit.options`` imports torch and transformers (seconds), so a command built with
its ``add_merge_options`` cannot show ``--help`` or report a config error without them.
This module declares the same click options, in the same order, with the same names,
types, defaults, help texts and help sections (a test compares them, and the whole
``--help`` text, with what mergekit's own decorator produces), and builds mergekit's
``MergeOptions`` from the parsed values only when a merge runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from mergekit_pcb import console

if TYPE_CHECKING:
    from mergekit.options import MergeOptions


class ShardSize(click.ParamType):
    """A parameter count such as ``5B``, ``500M`` or ``1000`` (mergekit's ``parse_kmb``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):  # the default, already a count
            return value
        from mergekit.common import parse_kmb  # only when the option is given

        try:
            return parse_kmb(value)
        except (ValueError, IndexError):
            self.fail(f"{value!r} is not a parameter count such as 5B, 500M or 1000", param, ctx)


@dataclass(frozen=True)
class MergeOption:
    """One field of mergekit's ``MergeOptions`` as ``add_merge_options`` declares it."""

    name: str
    type: Any
    default: Any
    help: str
    section: str
    decls: tuple[str, ...] = ()  # empty: --name-with-dashes (and --no-... for a bool)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def click_option(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        dashed = self.name.replace("_", "-")
        if self.decls:
            decls = self.decls
        elif self.type is bool:
            decls = (f"--{dashed}/--no-{dashed}",)
        else:
            decls = (f"--{dashed}",)
        return click.option(
            *decls,
            type=self.type,
            default=self.default,
            help=self.help,
            show_default=self.name not in ("out_shard_size", "verbosity"),
            **self.extra,
        )


#: mergekit 0.1.5's ``MergeOptions`` fields in declaration order, with ``OPTION_HELP``
#: and ``OPTION_CATEGORIES`` of ``mergekit/options.py``.
MERGE_OPTIONS: tuple[MergeOption, ...] = (
    MergeOption("allow_crimes", bool, False, "Allow mixing architectures", "Dangerous Options"),
    MergeOption(
        "unsafe_truncate_embeddings",
        bool,
        False,
        "UNSAFE: discard trailing embedding rows to match the smallest vocabulary. Assumes "
        "identical token IDs; use tokenizer configuration instead.",
        "Dangerous Options",
    ),
    MergeOption(
        "transformers_cache", str, None, "Override storage path for downloaded models", "Storage"
    ),
    MergeOption("lora_merge_cache", str, None, "Path to store merged LORA models", "Storage"),
    MergeOption(
        "lora_merge_dtype", str, None, "Override dtype when applying LoRAs", "Miscellaneous"
    ),
    MergeOption("cuda", bool, False, "Perform matrix arithmetic on GPU", "Performance"),
    MergeOption(
        "device", str, None, "Perform matrix arithmetic on specified device", "Performance"
    ),
    MergeOption(
        "low_cpu_memory",
        bool,
        False,
        "Store results and intermediate values on accelerator. Useful if VRAM > RAM",
        "Performance",
    ),
    MergeOption(
        "out_shard_size",
        ShardSize(),
        5_000_000_000,  # mergekit's parse_kmb("5B")
        "Number of parameters per output shard  [default: 5B]",
        "Output Settings",
    ),
    MergeOption("copy_tokenizer", bool, True, "Copy a tokenizer to the output", "Output Settings"),
    MergeOption(
        "clone_tensors",
        bool,
        False,
        "Clone tensors before saving, to allow multiple occurrences of the same layer",
        "Output Settings",
    ),
    MergeOption(
        "trust_remote_code",
        bool,
        False,
        "Trust remote code from huggingface repos (danger)",
        "Dangerous Options",
    ),
    MergeOption(
        "random_seed",
        int,
        None,
        "Seed for reproducible use of randomized merge methods",
        "Miscellaneous",
    ),
    MergeOption(
        "lazy_unpickle",
        bool,
        False,
        "Experimental lazy unpickler for lower memory usage",
        "Performance",
    ),
    MergeOption(
        "write_model_card",
        bool,
        True,
        "Output README.md containing details of the merge",
        "Output Settings",
    ),
    MergeOption(
        "safe_serialization",
        bool,
        True,
        "Save output in safetensors. Do this, don't poison the world with more pickled models.",
        "Output Settings",
    ),
    MergeOption(
        "verbosity",
        int,
        0,
        "Verbose logging (repeat for more verbosity)",
        "Miscellaneous",
        decls=("-v", "verbosity"),
        extra={"count": True},
    ),
    MergeOption(
        "quiet",
        bool,
        False,
        "Suppress progress bars and other non-essential output",
        "Miscellaneous",
    ),
    MergeOption(
        "read_to_gpu", bool, False, "Read model weights directly to accelerator", "Performance"
    ),
    MergeOption(
        "multi_gpu", bool, False, "Use multi-gpu parallel graph execution engine", "Performance"
    ),
    MergeOption(
        "num_threads",
        int,
        None,
        "Number of threads to use for parallel CPU operations",
        "Performance",
        decls=("--num-threads", "-j"),
    ),
    MergeOption(
        "gpu_rich",
        bool,
        False,
        "Alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu",
        "Performance",
        decls=("--gpu-rich",),
        extra={"is_flag": True},
    ),
    MergeOption(
        "async_write",
        bool,
        False,
        "Write output shards asynchronously (faster execution, higher memory use)",
        "Performance",
    ),
    MergeOption(
        "write_threads",
        int,
        1,
        "Number of threads to use for asynchronous writes",
        "Performance",
    ),
)

_SECTIONS = {option.name: option.section for option in MERGE_OPTIONS}


def add_merge_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options of :data:`MERGE_OPTIONS` on a click command; the command's function
    receives their values as one mapping, ``merge_values`` (see :func:`merge_options`)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {option.name: kwargs.pop(option.name) for option in MERGE_OPTIONS}
        return function(*args, merge_values=values, **kwargs)

    # Applied last field first (as mergekit does), so that --help lists them in field order.
    for option in reversed(MERGE_OPTIONS):
        wrapper = option.click_option()(wrapper)
    return wrapper


def merge_options(values: Mapping[str, Any]) -> MergeOptions:
    """mergekit's ``MergeOptions`` from the parsed values (imports mergekit, torch)."""
    from mergekit.options import MergeOptions

    return MergeOptions(**values)


def configure_logging(verbosity: int) -> None:
    """The root logging level that ``MergeOptions.apply_global_options`` sets (WARNING,
    ``-v`` INFO, ``-vv`` DEBUG), set before mergekit is imported so that the config
    checks' warnings show; mergekit's own ``basicConfig`` call later leaves it so."""
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    console.configure_logging(level)


class SectionedHelp(click.Command):
    """A command whose ``--help`` groups mergekit's options under mergekit's section
    titles and lists the others under "Script Options" (mergekit's ``PrettyPrintHelp``)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str | None, list[click.Parameter]] = {None: []}
        for param in ctx.command.params:
            sections.setdefault(_SECTIONS.get(param.name or ""), []).append(param)
        for section, params in sections.items():
            records = [param.get_help_record(ctx) for param in params]
            rows = [record for record in records if record is not None]
            if rows:
                with formatter.section(section or "Script Options"):
                    formatter.write_dl(rows)
