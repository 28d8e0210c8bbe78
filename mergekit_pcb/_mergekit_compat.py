"""The few private parts of mergekit 0.1.5 that this package uses, fenced in one place.

mergekit's public API covers registering a method and merging to disk or in memory;
the plugin needs a little more. Each item below says why it is needed and what
breaks if mergekit changes it; ``tests/test_mergekit_compat.py`` pins every one, so
that a mergekit upgrade fails loudly there rather than somewhere downstream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task

# ``ParameterSpec`` is not re-exported by ``mergekit.merge_methods`` (only used there by
# the built-in methods). Without it a method cannot declare a parameter named
# ``lambda``, which the ``merge_method`` decorator cannot spell. If it moves, importing
# mergekit_pcb fails at once. (method.py imports it from mergekit itself: it must not
# import this module at its top, see its docstring.)
from mergekit.merge_methods.base import ParameterSpec
from mergekit.options import MergeOptions

__all__ = [
    "ParameterSpec",
    "checkpoint_files",
    "load_tensor",
    "plan_saved_tensors",
    "plan_tensor_tasks",
    "setup_loaders",
    "shared_tensor_names",
    "stored_name",
    "tensor_loader",
    "unregister_method",
]


class _DropTorchDtypeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


@contextmanager
def _quiet_torch_dtype_setter() -> Iterator[None]:
    """``_model_out_config`` sets ``config.torch_dtype``, which transformers now logs as
    deprecated: the tuner's capture and the Evolver's plan would print mergekit's notice as
    if it were ours."""
    logger = logging.getLogger("transformers.configuration_utils")
    notice = _DropTorchDtypeNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def plan_tensor_tasks(config: MergeConfiguration, options: MergeOptions) -> list[tuple[str, Task]]:
    """``(output tensor name, task)`` for every tensor mergekit would write for ``config``.

    The tuner runs mergekit's own plan (parameter resolution, filters, slices, dtypes)
    and executes it in memory. The public ``MergePlanner.plan_in_memory()`` is tried
    first; in mergekit 0.1.5 it fails building ``ReturnTensor`` (an abstract-class
    check in pydantic), so the fallback reads the planner's private ``_plan()`` and
    ``_tensors`` (what ``plan_in_memory`` wraps). The output config comes from the
    private ``mergekit.merge._model_out_config``, as ``run_merge`` builds it. If either
    changes, the tuner cannot capture contributions.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = config.model_copy(deep=True)  # the planner normalises it in place
    arch_info = get_architecture_info(config, options)
    with _quiet_torch_dtype_setter():
        out_config = _model_out_config(
            config, arch_info, trust_remote_code=options.trust_remote_code
        )
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    try:
        returned = planner.plan_in_memory()
    except TypeError:
        planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
        planner._plan()
        return [(weight.name, task) for weight, task in planner._tensors]
    return [(r.weight_info.name, r.tensor_task) for r in returned]


def plan_saved_tensors(config: MergeConfiguration, options: MergeOptions) -> list[Any]:
    """mergekit-yaml's plan for ``config``: its ``SaveTensor`` tasks, in the order in
    which mergekit's (single-device) executor runs them.

    The evolver merges a population through these tasks' own merge tasks and, for the
    methods that draw random masks, in this order from the same seed, so that it draws
    what ``mergekit-yaml --random-seed`` draws. ``MergePlanner.plan_to_disk`` and the
    ``Executor``'s schedule are public; the output config comes from the private
    ``mergekit.merge._model_out_config``, as in :func:`plan_tensor_tasks`. Nothing is
    written: the writer task is only planned, never run.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = config.model_copy(deep=True)  # the planner normalises it in place
    arch_info = get_architecture_info(config, options)
    with _quiet_torch_dtype_setter():
        out_config = _model_out_config(
            config, arch_info, trust_remote_code=options.trust_remote_code
        )
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    targets = planner.plan_to_disk(out_path="<not written>")
    executor = Executor(targets, math_device=options.device, storage_device="cpu")
    return [
        task
        for task in (handle.task() for handle in executor.schedule.tasks)
        if isinstance(task, SaveTensor)
    ]


def stored_name(load: Any, loader: Any) -> str | None:
    """The name under which a ``LoadTensor`` task finds its tensor in ``loader``'s
    checkpoint (its own name, an alias or a tied name), or None.

    ``LoadTensor._resolve_name`` is private: it is what mergekit reads; None means
    mergekit would try converting the checkpoint's tensors instead.
    """
    return load._resolve_name(loader)


def tensor_loader(model: Hashable) -> Any:
    """mergekit's cached lazy loader of ``model`` (a ``ModelReference``).

    ``LoaderCache`` (``mergekit.io.tasks``) is internal: ``scope: model`` needs to read
    every tensor of every checkpoint before the planner hands it the first one, with
    the same loaders (LoRA merging, caches) that the merge itself uses.
    """
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model)


def setup_loaders(options: MergeOptions) -> None:
    """Configure mergekit's loader cache from ``options`` (LoRA and HF caches), as
    ``run_merge`` does before planning; ``LoaderCache.setup`` is internal."""
    from mergekit.io.tasks import LoaderCache

    LoaderCache().setup(options=options)


def shared_tensor_names(loaders: list[Any]) -> list[str]:
    """Names stored in every loader's checkpoint, in the first loader's order.

    Reads ``loader.index.tensor_paths`` (the shard index of ``LazyTensorLoader``).
    """
    first, *rest = loaders
    return [
        name
        for name in first.index.tensor_paths
        if all(name in loader.index.tensor_paths for loader in rest)
    ]


def checkpoint_files(loader: Any) -> Iterator[str]:
    """Paths of the shard files behind a loader (``index.base_path`` + ``tensor_paths``)."""
    index = loader.index
    yield from sorted({os.path.join(index.base_path, f) for f in index.tensor_paths.values()})


def load_tensor(loader: Any, name: str, device: torch.device | str) -> torch.Tensor:
    """One tensor of a checkpoint through its loader, on ``device``."""
    return loader.get_tensor(name, device=str(device))


def unregister_method(name: str) -> None:
    """Remove a method from mergekit's registry (which has no public way to do so).

    The tuner registers a private capturing copy of the config's method for the
    length of one capture; this drops it again from ``registry._METHODS``.
    """
    from mergekit.merge_methods import registry

    if name in registry._METHODS:
        del registry._METHODS[name]
    assert all(m.spec.name != name for m in merge_methods.registered_methods())
