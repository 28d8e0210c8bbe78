"""``scope: model`` inside a mergekit merge: whole-model statistics for a tensor group.

mergekit hands ``pcb`` one tensor at a time, but the authors' statistics span the
whole model. The first ``scope: model`` tensor of a merge therefore streams every
tensor the checkpoints share through mergekit's own loaders (on the device and in
the dtype the group has, so the statistics match what the merge computes) into
:func:`mergekit_pcb.model_stats.whole_model_stats`; later tensors of the same merge
find the result in a small cache keyed by the models, settings and file times.

The cache is guarded by a lock: mergekit's multi-GPU executor runs tasks in threads,
and the first tensor of each thread would otherwise start the pass again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods import TensorGroup

from mergekit_pcb import _mergekit_compat as compat
from mergekit_pcb.console import nested_bars_disabled
from mergekit_pcb.errors import MergeInputError, non_finite_input
from mergekit_pcb.model_stats import whole_model_stats
from mergekit_pcb.pcb import ModelStats, NonFiniteInputError, PCBOptions

LOG = logging.getLogger(__name__)

_CACHE_SIZE = 16
_cache: OrderedDict[tuple, tuple[list[ModelStats | None], frozenset[str]]] = OrderedDict()
_cache_lock = threading.Lock()


def group_model_stats(
    group: TensorGroup, densities: Sequence[float], options: PCBOptions
) -> list[ModelStats | None]:
    """Per fine-tune of ``group``, its statistics over every tensor of the checkpoints."""
    base = group.base.tensor
    refs = [group.base.id, *(entry.id for entry in group.non_base)]
    if not all(isinstance(ref, ModelReference) for ref in refs):
        raise ValueError(
            "pcb scope: model needs models that mergekit loads (mergekit-yaml, run_merge); "
            "for tensors in memory, use mergekit_pcb.model_stats.whole_model_stats"
        )
    loaders = [compat.tensor_loader(ref) for ref in refs]
    files = tuple(
        (path, os.path.getmtime(path))
        for loader in loaders
        for path in compat.checkpoint_files(loader)
    )
    key = (tuple(refs), tuple(densities), options, base.dtype, str(base.device), files)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None:
            names = compat.shared_tensor_names(loaders)
            cached = (_compute(refs, loaders, names, base, densities, options), frozenset(names))
            _cache[key] = cached
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    if group.metadata.name not in cached[1]:
        raise MergeInputError(
            f"pcb scope: model: tensor {group.metadata.name} is not stored under that name in "
            "every checkpoint, so it has no whole-model statistics"
        )
    return cached[0]


def _compute(
    refs: list[ModelReference],
    loaders: list,
    names: list[str],
    like: torch.Tensor,
    densities: Sequence[float],
    options: PCBOptions,
) -> list[ModelStats | None]:
    def tensors() -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        for name in names:
            loaded = [compat.load_tensor(loader, name, like.device) for loader in loaders]
            if all(t.is_floating_point() for t in loaded):
                loaded = [t.to(dtype=like.dtype) for t in loaded]
            yield name, loaded[0], loaded[1:]

    LOG.info("pcb scope: model: computing whole-model statistics for %d models", len(refs) - 1)
    try:
        return whole_model_stats(
            tensors,
            densities,
            options,
            n_tensors=len(names),
            progress=not nested_bars_disabled(),
        )
    except NonFiniteInputError as error:
        index = 0 if error.model_index is None else error.model_index + 1
        raise non_finite_input(refs[index], is_base=index == 0, tensor=error.tensor_name) from None
