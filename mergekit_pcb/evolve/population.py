"""The evolver's population: every fine-tune's tensors, where they live, and their offspring.

An individual is one fine-tuned model of the config (the base is not one: it stays as
it is), held tensor by tensor in its checkpoint's dtype (a bf16 checkpoint costs 2
bytes per parameter). Where it lives follows the tuner's placement rule
(:class:`~mergekit_pcb.tune.placement.Placement`): on the merge's GPU while that
GPU's budget lasts (its free memory beside the live model, less the room kept for the
objective), else in CPU memory while half the RAM lasts, else on disk. On disk, an
individual that has not changed is read from its own checkpoint through mergekit's
loader (nothing is copied); one that has changed is a safetensors model folder under
the run's cache folder. The base is placed the same way (it is an input of every
merged tensor), before the individuals.

**The offspring is stored while it is judged, when memory allows.** A candidate reads
its offspring at least twice (once for the merge, once more if it is accepted), and
``pcb`` with ``scope: model`` reads it four more times for the whole-model statistics;
each reading of a regenerated offspring draws its crossover mask again on the CPU, the
largest part of its cost. So one spare individual is placed last, by the same rule:
if it gets memory (GPU or CPU), each offspring is written into it once and an accepted
one simply changes places with its parent (no copy). If memory has no room for it,
the offspring is regenerated from its key tensor by tensor wherever it is read (a
disk copy per candidate would cost more than the draws), and written over its parent
only when accepted.

The population can write any individual as a model folder that transformers and
mergekit load: safetensors shards, and the original's ``config.json``, tokenizer and
other small files (:func:`write_model_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mergekit_pcb import _mergekit_compat as compat
from mergekit_pcb.console import bars_disabled
from mergekit_pcb.errors import ConfigError, MergeInputError
from mergekit_pcb.evolve.offspring import OffspringKey
from mergekit_pcb.tune.placement import Placement

LOG = logging.getLogger(__name__)

#: Largest safetensors shard written for an individual (mergekit's default shard size).
SHARD_BYTES = 5_000_000_000

#: Files of a model folder that hold weights (never copied from the original).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
#: Files that describe the original model rather than the individual.
_NOT_COPIED = frozenset({"README.md", "mergekit_config.yml", "model.safetensors.index.json"})


@dataclass(frozen=True)
class TensorInfo:
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class ModelTensors(ABC):
    """One model's tensors by their stored names, wherever they live.

    ``get`` may return the stored tensor itself: callers read it, never write it
    (mergekit's methods do not modify their inputs either).
    """

    def __init__(self, info: dict[str, TensorInfo]):
        self.info = info  # in checkpoint order

    @property
    def names(self) -> list[str]:
        return list(self.info)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())

    @abstractmethod
    def get(self, name: str, device: torch.device | str) -> torch.Tensor: ...

    @property
    @abstractmethod
    def where(self) -> str:
        """``cuda:0``, ``cpu``, ``disk`` (read from a checkpoint) or ``regenerated``."""

    def close(self) -> None:  # noqa: B027  (only disk-backed tensors hold files)
        """Let go of open files (disk)."""


class MemoryTensors(ModelTensors):
    """Tensors held in memory, on one device."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device):
        super().__init__({n: TensorInfo(t.shape, t.dtype) for n, t in tensors.items()})
        self.tensors = tensors
        self.device = device

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        return self.tensors[name].to(device)

    @property
    def where(self) -> str:
        return str(self.device)


class CheckpointTensors(ModelTensors):
    """Tensors read from a checkpoint on disk, tensor by tensor (memory-mapped shards)."""

    def __init__(self, loader: LazyTensorLoader, folder: str | None = None):
        super().__init__(stored_info(loader))
        self.loader = loader
        self.folder = folder  # a folder this population wrote (removed with it), or None

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        return self.loader.get_tensor(name, device=str(device))

    @property
    def where(self) -> str:
        return "disk"

    def close(self) -> None:
        self.loader.flush()


class OffspringTensors(ModelTensors):
    """An offspring that is not stored: each tensor is mixed again wherever it is read."""

    def __init__(self, key: OffspringKey, parent: ModelTensors, partner: ModelTensors):
        super().__init__(dict(parent.info))
        self.key = key
        self.parent = parent
        self.partner = partner

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        return self.key.tensor(name, self.parent.get(name, device), self.partner.get(name, device))

    @property
    def where(self) -> str:
        return "regenerated"


def stored_info(loader: LazyTensorLoader) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor of a checkpoint, from the safetensors headers
    (a pickled checkpoint is read)."""
    index = loader.index
    info: dict[str, TensorInfo] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in index.tensor_paths.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        path = os.path.join(index.base_path, file)
        if file.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                for name in names:
                    piece = handle.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ConfigError(
                            f"{path}: tensor {name} has dtype {piece.get_dtype()}, which the "
                            "evolver cannot store"
                        )
                    info[name] = TensorInfo(torch.Size(piece.get_shape()), dtype)
        else:
            for name in names:
                tensor = loader.get_tensor(name)
                info[name] = TensorInfo(tensor.shape, tensor.dtype)
    return {name: info[name] for name in index.tensor_paths}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def individual_refs(
    config: MergeConfiguration,
) -> tuple[ModelReference | None, list[ModelReference]]:
    """The config's base and its individuals: every model of ``models:`` but the base."""
    if not config.models:
        raise ConfigError(
            "the evolver needs a config with a 'models:' list (slices and modules are not "
            "supported: an individual is a whole fine-tuned model)"
        )
    base = config.base_model
    refs = [entry.model for entry in config.models if entry.model != base]
    if len(refs) != len(set(refs)):
        raise ConfigError("a model is listed twice in 'models:'; each individual is one model")
    if len(refs) < 2:
        raise ConfigError(
            f"the evolver needs at least two models besides the base to cross; the config "
            f"has {len(refs)}"
        )
    return base, refs


class Population:
    """The individuals (and the base) of a config, placed, with their offspring."""

    def __init__(
        self,
        base_ref: ModelReference | None,
        base: ModelTensors | None,
        refs: Sequence[ModelReference],
        individuals: Sequence[ModelTensors],
        *,
        spare_device: torch.device | None,
        cache_dir: str | None,
        sources: Sequence[str],
    ):
        self.base_ref = base_ref
        self.base = base
        self.refs = list(refs)
        self.individuals = list(individuals)
        self.spare_device = spare_device  # where offspring are stored (None: regenerated)
        self.cache_dir = cache_dir
        self.sources = list(sources)  # each individual's original folder (small files)
        self._spare: dict[str, torch.Tensor] = {}
        self._written = 0
        _check_alike(self.refs, self.individuals)

    @property
    def n(self) -> int:
        return len(self.individuals)

    @property
    def names(self) -> list[str]:
        """Each individual's name: its model reference as the config writes it."""
        return [str(ref) for ref in self.refs]

    @classmethod
    def load(
        cls,
        config: MergeConfiguration,
        options: MergeOptions | None = None,
        *,
        placement: Placement | None = None,
        cache_dir: str | None = None,
        device: torch.device | str | None = None,
    ) -> Population:
        """Read the base and every individual of ``config`` into their places.

        ``device``: the merge's device (default: ``options.device``); ``placement``
        (default: everything on ``device``) decides, slot by slot, what lives there,
        in CPU memory or on disk (``cache_dir`` then holds the individuals that change).
        """
        options = options or MergeOptions(quiet=True)
        device = torch.device(device or options.device)
        if device.type == "cuda" and device.index is None:
            # Placement budgets are kept per numbered device ("cuda:0").
            device = torch.device("cuda", torch.cuda.current_device())
        placement = placement or Placement(mode="device")
        base_ref, refs = individual_refs(config)
        compat.setup_loaders(options)
        checkpoints = {ref: compat.tensor_loader(ref) for ref in [base_ref, *refs] if ref}
        infos = {ref: stored_info(loader) for ref, loader in checkpoints.items()}

        def place(ref: ModelReference, label: str) -> ModelTensors:
            nbytes = sum(i.nbytes for i in infos[ref].values())
            target = placement.choose(nbytes, device)
            loader = checkpoints[ref]
            # An individual's NaN or Inf would spread through its offspring under the
            # names of other models: refuse it here, naming it.
            check = label == "individual"
            if target == "disk":
                if cache_dir is None:
                    raise ConfigError(
                        f"{label} {ref} does not fit in memory and no cache folder was given"
                    )
                store: ModelTensors = CheckpointTensors(loader)
                if check:
                    for name in store.names:
                        _check_finite(ref, name, store.get(name, device))
            else:
                tensors = _read_all(loader, infos[ref], target, label, options.quiet)
                if check:
                    for name, tensor in tensors.items():
                        _check_finite(ref, name, tensor)
                store = MemoryTensors(tensors, torch.device(target))
            LOG.info("%s %s: %s, %s", label, ref, _gib(store.nbytes), store.where)
            return store

        base = place(base_ref, "base") if base_ref is not None else None
        individuals = [place(ref, "individual") for ref in refs]
        spare_bytes = max(store.nbytes for store in individuals)
        spare = placement.choose(spare_bytes, device)
        spare_device = None if spare == "disk" else torch.device(spare)
        if spare_device is None:
            LOG.info(
                "offspring: regenerated where read (no memory left for a spare %s)",
                _gib(spare_bytes),
            )
        else:
            LOG.info("offspring: stored while judged, %s on %s", _gib(spare_bytes), spare)
        sources = [_source_folder(checkpoints[ref]) for ref in refs]
        return cls(
            base_ref,
            base,
            refs,
            individuals,
            spare_device=spare_device,
            cache_dir=cache_dir,
            sources=sources,
        )

    def describe(self) -> str:
        """Where each individual lives and how many bytes it takes, in one line."""
        parts = [
            f"{name}: {_gib(s.nbytes)} {s.where}"
            for name, s in zip(self.names, self.individuals, strict=True)
        ]
        if self.base is not None:
            parts.insert(0, f"base: {_gib(self.base.nbytes)} {self.base.where}")
        return "; ".join(parts)

    def floating(self) -> dict[str, bool]:
        """Stored name -> whether the individuals' tensor is floating point (evolves)."""
        first = self.individuals[0]
        return {name: info.dtype.is_floating_point for name, info in first.info.items()}

    def members(self, replaced: dict[int, ModelTensors] | None = None) -> list[ModelTensors]:
        """The individuals, with ``replaced`` ones (index -> tensors) swapped in."""
        replaced = replaced or {}
        return [replaced.get(i, store) for i, store in enumerate(self.individuals)]

    def offspring(self, key: OffspringKey) -> ModelTensors:
        """Offspring ``key`` of the current population (stored in the spare if there is one).

        A stored offspring lives in the spare: it is valid until the next call, and
        member lists taken before an :meth:`accept` must not be used after it.
        """
        parent = self.individuals[key.individual]
        partner = self.individuals[key.partner]
        if self.spare_device is None:
            return OffspringTensors(key, parent, partner)
        device = self.spare_device
        for name, info in parent.info.items():
            out = self._spare.get(name)
            if out is None or out.shape != info.shape or out.dtype != info.dtype:
                out = torch.empty(info.shape, dtype=info.dtype, device=device)
                self._spare[name] = out
            key.tensor(name, parent.get(name, device), partner.get(name, device), out=out)
        for name in set(self._spare) - set(parent.info):
            del self._spare[name]
        return MemoryTensors(dict(self._spare), device)

    def accept(self, key: OffspringKey, offspring: ModelTensors) -> None:
        """Make ``offspring`` (made by :meth:`offspring` for ``key``) the individual."""
        i = key.individual
        old = self.individuals[i]
        stored = isinstance(offspring, MemoryTensors) and all(
            self._spare.get(name) is tensor for name, tensor in offspring.tensors.items()
        )
        if stored:
            if isinstance(old, MemoryTensors):
                # Parent and spare change places: the old parent's memory is the next spare.
                self._spare = old.tensors
                self.spare_device = old.device
                self.individuals[i] = MemoryTensors(offspring.tensors, offspring.device)
            else:
                self.individuals[i] = self._to_disk(i, offspring)
                old.close()
                self._discard(old)
            return
        if isinstance(old, MemoryTensors):
            # Each tensor of the offspring depends on the same tensor of the parent only.
            partner = self.individuals[key.partner]
            for name, tensor in old.tensors.items():
                key.tensor(name, tensor, partner.get(name, tensor.device), out=tensor)
            return
        self.individuals[i] = self._to_disk(i, offspring)
        old.close()
        self._discard(old)

    def _to_disk(self, i: int, tensors: ModelTensors) -> CheckpointTensors:
        if self.cache_dir is None:
            raise ValueError("an individual placed on disk needs a cache folder")
        self._written += 1
        folder = os.path.join(self.cache_dir, f"individual-{i}-{self._written}")
        write_model_folder(tensors, folder, self.sources[i], quiet=True)
        return CheckpointTensors(LazyTensorLoader.from_disk(folder), folder=folder)

    @staticmethod
    def _discard(store: ModelTensors) -> None:
        if isinstance(store, CheckpointTensors) and store.folder is not None:
            shutil.rmtree(store.folder, ignore_errors=True)

    def write_individual(self, i: int, folder: str, *, quiet: bool = False) -> None:
        """Write individual ``i`` as a model folder (see :func:`write_model_folder`)."""
        write_model_folder(self.individuals[i], folder, self.sources[i], quiet=quiet)

    def close(self) -> None:
        for store in [self.base, *self.individuals]:
            if store is not None:
                store.close()


def _check_alike(refs: Sequence[ModelReference], individuals: Sequence[ModelTensors]) -> None:
    """Refuse individuals that cannot be crossed: a tensor missing or shaped differently."""
    first_ref, first = refs[0], individuals[0]
    for ref, store in zip(refs[1:], individuals[1:], strict=True):
        for name in first.info.keys() ^ store.info.keys():
            holder, other = (first_ref, ref) if name in first.info else (ref, first_ref)
            raise ConfigError(
                f"tensor {name} is stored in model {holder} but not in model {other}: "
                "individuals must hold the same tensors to be crossed"
            )
        for name, info in first.info.items():
            if store.info[name].shape != info.shape:
                raise ConfigError(
                    f"tensor {name} has shape {tuple(info.shape)} in model {first_ref} and "
                    f"{tuple(store.info[name].shape)} in model {ref}: individuals must match "
                    "to be crossed"
                )


def _check_finite(ref: ModelReference, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeInputError(
            f"model {ref} has NaN or Inf values in tensor {name}: it cannot be evolved"
        )


def _read_all(
    loader: LazyTensorLoader, info: dict[str, TensorInfo], device: str, label: str, quiet: bool
) -> dict[str, torch.Tensor]:
    tensors = {}
    bar = tqdm(
        info, desc=f"Reading {label}", unit="tensor", leave=False, disable=bars_disabled(quiet)
    )
    for name in bar:
        # clone(): a tensor read on the CPU may be a view of a memory-mapped shard.
        tensors[name] = loader.get_tensor(name, device=device).clone()
    loader.flush()
    return tensors


def _source_folder(loader: LazyTensorLoader) -> str:
    return loader.index.base_path


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _shards(tensors: ModelTensors, limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.info.items():
        if shards[-1] and size + info.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def write_model_folder(
    tensors: ModelTensors,
    folder: str,
    source: str,
    *,
    shard_bytes: int = SHARD_BYTES,
    quiet: bool = False,
) -> None:
    """Write ``tensors`` as a model folder that transformers and mergekit load.

    The weights go to ``model.safetensors`` (or numbered shards of at most
    ``shard_bytes`` with ``model.safetensors.index.json``); the small files of the
    original folder ``source`` (``config.json``, the tokenizer's files, generation
    settings) are copied. The folder is written beside its place and moved there when
    complete, so a failure leaves an earlier one as it was.
    """
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".individual-", dir=parent)
    try:
        shards = _shards(tensors, shard_bytes)
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        )
        for file, names in tqdm(
            list(zip(files, shards, strict=True)),
            desc=f"Writing {os.path.basename(folder)}",
            unit="shard",
            disable=bars_disabled(quiet),
            leave=False,
        ):
            part = {n: tensors.get(n, "cpu").contiguous() for n in names}
            save_file(part, os.path.join(staging, file), metadata={"format": "pt"})
            del part
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": tensors.nbytes},
                "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
            }
            with open(
                os.path.join(staging, "model.safetensors.index.json"), "w", encoding="utf-8"
            ) as handle:
                json.dump(index, handle, indent=2)
        for name in _small_files(source):
            shutil.copy2(os.path.join(source, name), os.path.join(staging, name))
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _small_files(source: str) -> Iterator[str]:
    names: Iterable[str] = sorted(os.listdir(source)) if os.path.isdir(source) else ()
    for name in names:
        if (
            os.path.isfile(os.path.join(source, name))
            and not name.endswith(_WEIGHT_SUFFIXES)
            and not name.endswith(".index.json")
            and name not in _NOT_COPIED
        ):
            yield name
