"""The merge of a population, computed by mergekit's own code, written into a live model.

The evolver judges a population by the merge the config describes (its
``merge_method`` with its parameters: ``pcb`` in either scope, ``ties``,
``dare_ties``, ``della``, ``task_arithmetic``, ``linear`` ...). Re-implementing each
method would drift from mergekit, so nothing is: :class:`PopulationMerge` plans the
config once with mergekit's planner, exactly as ``mergekit-yaml`` would, and keeps, per
output tensor, mergekit's own merge task (which models, bound parameters, base,
optional-tensor policy) and what its loading step would do (which stored tensor of
each model, under which name or alias, cast to which dtype, on which device) and the
dtype the tensor is saved in. Per candidate it hands each merge task the population's
tensors in place of the checkpoints' and runs it (``ExecuteMergeMethodTask.execute``:
the very call mergekit's executor makes), in the order mergekit's executor runs them,
and copies the result into one live transformers model in place. Nothing is written to
disk. So the live model holds, bit for bit, what ``mergekit-yaml`` writes for the
population saved as model folders, as transformers loads it in the live model's dtype
(tested for every method named above, in float32 and bfloat16).

What needs care:

* **Tensors that do not depend on the population** (only the base's, or buffers that
  are not floating point, which offspring never change) are written once
  (:meth:`PopulationMerge.write_fixed`), not per candidate.
* **Random methods** (``dare_*``, ``della*``): mergekit draws their masks from torch's
  global generator, seeded by ``--random-seed`` at the start of a merge. Each
  candidate's merge runs from that seed, in mergekit's order, inside a forked generator
  state (the caller's state is untouched), so it draws what ``mergekit-yaml
  --random-seed`` draws and candidates are judged under the same masks. Without a seed
  such a merge is not reproducible, by mergekit either, and is refused.
* **``pcb`` with ``scope: model``** needs whole-model statistics of the population being
  merged. The registered ``pcb`` reads them from the checkpoints on disk and caches them
  by file path and modification time, neither of which changes for a population in
  memory: it would merge every candidate with the statistics of the original
  fine-tunes. So a private copy of the method, reading them from the current population
  (computed once per candidate and settings), is registered for the life of the
  :class:`PopulationMerge` and its merge tasks point at it.
* **Refused** (one error naming the feature): a tokenizer section or
  ``tokenizer_source`` (mergekit permutes embedding rows across vocabularies),
  ``--unsafe-truncate-embeddings``, tensors mergekit would obtain by converting a
  checkpoint, ``slices:``/``modules:`` (an individual is a whole model; see
  :func:`~mergekit_pcb.evolve.population.individual_refs`), ``--multi-gpu`` with a
  random method (its GPUs merge tensors concurrently, in no fixed order).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from mergekit import merge_methods
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import GatherTensors
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.sparsify import SparsificationMethod
from tqdm import tqdm

from mergekit_pcb import _mergekit_compat as compat
from mergekit_pcb.console import bars_disabled
from mergekit_pcb.errors import ConfigError, MergeInputError, non_finite_input
from mergekit_pcb.evolve.population import ModelTensors, individual_refs, stored_info
from mergekit_pcb.method import PCBMerge
from mergekit_pcb.model_stats import whole_model_stats
from mergekit_pcb.pcb import ModelStats, NonFiniteInputError, PCBOptions
from mergekit_pcb.tune.contributions import named_tensors

LOG = logging.getLogger(__name__)

_RANDOM_SPARSIFICATION = (SparsificationMethod.random, SparsificationMethod.della_magprune)
#: Methods of mergekit 0.1.5 that draw from torch's generator besides the sparsifying
#: ones (arcee_fusion samples large tensors to estimate quantiles).
_RANDOM_METHODS = frozenset({"arcee_fusion"})

_private_names = itertools.count()


@dataclass(frozen=True)
class PlannedInput:
    """One model's input to a merged tensor, as mergekit's loading step gets it."""

    model: ModelReference
    stored_name: str  # the name in the checkpoint (the tensor's own, an alias, a tied name)
    dtype: torch.dtype | None  # the cast on loading (the config's dtype, a forced dtype)
    device: torch.device  # where the merge task receives it


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: mergekit's merge task, its inputs, and the dtype it is saved in."""

    name: str
    task: ExecuteMergeMethodTask
    inputs: tuple[PlannedInput, ...]
    out_dtype: torch.dtype | None
    optional: bool


def draws_random_masks(method: merge_methods.MergeMethod) -> bool:
    """Whether a registered mergekit method draws from torch's random generator."""
    if isinstance(method, GeneralizedTaskArithmeticMerge):
        return method.sparsification_method in _RANDOM_SPARSIFICATION
    return method.spec.name in _RANDOM_METHODS


def check_config(config: MergeConfiguration, options: MergeOptions) -> None:
    """Refuse what a population merge cannot reproduce exactly (see the module)."""
    individual_refs(config)
    if config.tokenizer is not None or config.tokenizer_source is not None:
        raise ConfigError(
            "the evolver cannot merge a config with a tokenizer section or tokenizer_source: "
            "mergekit then permutes embedding rows between vocabularies; the fine-tunes "
            "must share the base's vocabulary (drop the setting)"
        )
    if options.unsafe_truncate_embeddings:
        raise ConfigError("the evolver cannot merge with --unsafe-truncate-embeddings")
    method = merge_methods.get(config.merge_method)
    if draws_random_masks(method):
        if options.random_seed is None:
            raise ConfigError(
                f"merge_method: {config.merge_method} draws random masks; the evolver needs "
                "a random seed (mergekit-yaml's --random-seed) so that every candidate's "
                "merge, and mergekit-yaml's merge of the result, draw the same ones"
            )
        if options.multi_gpu:
            raise ConfigError(
                f"merge_method: {config.merge_method} draws random masks, and with "
                "--multi-gpu mergekit merges tensors in no fixed order: the evolver cannot "
                "reproduce that merge"
            )


def _needs_population_stats(task: ExecuteMergeMethodTask) -> bool:
    method = merge_methods.get(task.method_name)
    return isinstance(method, PCBMerge) and task.parameters.get("scope", "tensor") == "model"


def plan_population_merge(config: MergeConfiguration, options: MergeOptions) -> list[PlannedTensor]:
    """Every output tensor of ``config``'s merge, as mergekit-yaml plans it, in its order."""
    check_config(config, options)
    compat.setup_loaders(options)
    planned = []
    for save in compat.plan_saved_tensors(config, options):
        task = save.tensor_task
        if not isinstance(task, ExecuteMergeMethodTask) or not isinstance(
            task.gather_tensors, GatherTensors
        ):
            raise ConfigError(
                f"tensor {save.tensor_name}: mergekit prepares its inputs with "
                f"{type(getattr(task, 'gather_tensors', task)).__name__} (vocabulary "
                "alignment or truncation), which the evolver cannot reproduce"
            )
        inputs = []
        for load in task.gather_tensors.arguments().values():
            loader = compat.tensor_loader(load.model)
            stored = compat.stored_name(load, loader)
            if stored is None:
                if not load.optional or load.execute() is not None:
                    raise ConfigError(
                        f"tensor {load.tensor} of model {load.model} is not stored under that "
                        "name (mergekit would convert the checkpoint): the evolver cannot "
                        "merge it"
                    )
                continue  # an optional tensor the model lacks: mergekit passes none
            load_device = torch.device(load.device or "cpu")
            device = torch.device(options.device) if task.uses_accelerator() else load_device
            inputs.append(PlannedInput(load.model, stored, dtype_from_name(load.dtype), device))
        planned.append(
            PlannedTensor(
                save.tensor_name,
                task,
                tuple(inputs),
                dtype_from_name(save.dtype),
                save.optional,
            )
        )
    return planned


class PopulationStats:
    """``scope: model`` statistics of the population being merged (a ``ModelStatsSource``).

    :meth:`begin` names the models of a candidate; the first group asking for a set of
    settings (densities, clamp ratio, switches, dtype, device) computes them over every
    tensor the models share, exactly as the registered ``pcb`` does over checkpoints.
    """

    def __init__(self, progress: bool = False):
        self.sources: Mapping[ModelReference, ModelTensors] = {}
        self.cache: dict[tuple, tuple[list[ModelStats | None], frozenset[str]]] = {}
        self.progress = progress

    def begin(self, sources: Mapping[ModelReference, ModelTensors]) -> None:
        self.sources = sources
        self.cache.clear()

    def __call__(
        self, group: TensorGroup, densities: Sequence[float], options: PCBOptions
    ) -> list[ModelStats | None]:
        like = group.base.tensor
        refs = [group.base.id, *(entry.id for entry in group.non_base)]
        key = (tuple(refs), tuple(densities), options, like.dtype, str(like.device))
        cached = self.cache.get(key)
        if cached is None:
            stores = [self.sources[ref] for ref in refs]
            names = [n for n in stores[0].names if all(n in s.info for s in stores[1:])]

            def tensors() -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
                for name in names:
                    loaded = [store.get(name, like.device) for store in stores]
                    if all(t.is_floating_point() for t in loaded):
                        loaded = [t.to(dtype=like.dtype) for t in loaded]
                    yield name, loaded[0], loaded[1:]

            try:
                stats = whole_model_stats(
                    tensors, densities, options, progress=self.progress, n_tensors=len(names)
                )
            except NonFiniteInputError as error:
                index = 0 if error.model_index is None else error.model_index + 1
                raise non_finite_input(
                    refs[index], is_base=index == 0, tensor=error.tensor_name
                ) from None
            cached = (stats, frozenset(names))
            self.cache[key] = cached
        if group.metadata.name not in cached[1]:
            raise MergeInputError(
                f"pcb scope: model: tensor {group.metadata.name} is not stored under that "
                "name in every model, so it has no whole-model statistics"
            )
        return cached[0]


class PopulationMerge:
    """The config's merge of any population, written into a live model in place.

    Use as a context manager (or call :meth:`close`): ``scope: model`` registers a
    private copy of ``pcb`` with mergekit for the object's life.
    """

    def __init__(
        self,
        config: MergeConfiguration,
        options: MergeOptions | None = None,
        *,
        floating: Mapping[str, bool] | None = None,
    ):
        """``floating``: stored name -> whether the individuals' tensor is floating
        point (default: read from the checkpoints); a merged tensor whose individual
        inputs are all integer buffers does not change and is written once."""
        self.options = options or MergeOptions(quiet=True)
        self.base_ref, self.refs = individual_refs(config)
        self.planned = plan_population_merge(config, self.options)
        self.random_seed = (
            self.options.random_seed
            if draws_random_masks(merge_methods.get(config.merge_method))
            else None
        )
        self.stats = PopulationStats(progress=not bars_disabled(self.options.quiet))
        self._private: str | None = None
        if any(_needs_population_stats(p.task) for p in self.planned):
            self._register_private_pcb()
        individuals = set(self.refs)
        floating = floating if floating is not None else self._floating()
        varies = [
            any(i.model in individuals and floating.get(i.stored_name, True) for i in p.inputs)
            for p in self.planned
        ]
        self.varying = [p for p, v in zip(self.planned, varies, strict=True) if v]
        self.fixed = [p for p, v in zip(self.planned, varies, strict=True) if not v]
        self._missing_warned = False

    def _floating(self) -> dict[str, bool]:
        info = stored_info(compat.tensor_loader(self.refs[0]))
        return {name: i.dtype.is_floating_point for name, i in info.items()}

    def _register_private_pcb(self) -> None:
        original = next(
            merge_methods.get(p.task.method_name)
            for p in self.planned
            if _needs_population_stats(p.task)
        )
        self._private = f"_mergekit_pcb_evolve_{next(_private_names)}_pcb"
        merge_methods.register(
            PCBMerge(spec=replace(original.spec, name=self._private), model_stats=self.stats)
        )
        self.planned = [
            replace(p, task=p.task.model_copy(update={"method_name": self._private}))
            if _needs_population_stats(p.task)
            else p
            for p in self.planned
        ]

    def close(self) -> None:
        if self._private is not None:
            compat.unregister_method(self._private)
            self._private = None

    def __enter__(self) -> PopulationMerge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sources(
        self, base: ModelTensors | None, members: Sequence[ModelTensors]
    ) -> dict[ModelReference, ModelTensors]:
        """Model reference -> tensors, for the base and the individuals in config order."""
        if len(members) != len(self.refs):
            raise ValueError(f"expected {len(self.refs)} individuals, got {len(members)}")
        out = dict(zip(self.refs, members, strict=True))
        if self.base_ref is not None:
            if base is None:
                raise ValueError(f"the config's base {self.base_ref} was not given")
            out[self.base_ref] = base
        return out

    @contextmanager
    def _random_state(self) -> Iterator[None]:
        if self.random_seed is None:
            yield
            return
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.random_seed)  # what --random-seed sets for mergekit-yaml
            yield

    def _merge(
        self, planned: PlannedTensor, sources: Mapping[ModelReference, ModelTensors]
    ) -> torch.Tensor | None:
        tensors = {}
        for source in planned.inputs:
            tensor = sources[source.model].get(source.stored_name, source.device)
            if source.dtype is not None and tensor.dtype != source.dtype:
                tensor = tensor.to(dtype=source.dtype)
            tensors[source.model] = tensor
        result = planned.task.execute(tensors=tensors)
        if result is not None and planned.out_dtype is not None:
            result = result.to(dtype=planned.out_dtype)
        if result is None and not planned.optional:
            raise MergeInputError(f"mergekit gave no value for required tensor {planned.name}")
        return result

    def merged_tensors(
        self,
        base: ModelTensors | None,
        members: Sequence[ModelTensors],
        *,
        fixed: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` for every tensor that depends on the population (with
        ``fixed``: for the others), in mergekit's order, as it saves them."""
        sources = self.sources(base, members)
        self.stats.begin(sources)
        with torch.no_grad(), self._random_state():
            for planned in tqdm(
                self.fixed if fixed else self.varying,
                desc="Merging the population",
                unit="tensor",
                disable=bars_disabled(self.options.quiet),
                leave=False,
            ):
                value = self._merge(planned, sources)
                if value is not None:
                    yield planned.name, value
        self.stats.begin({})  # drop the references to the candidate's tensors

    def write_merge(
        self, model: torch.nn.Module, base: ModelTensors | None, members: Sequence[ModelTensors]
    ) -> None:
        """Write the merge of ``members`` (the individuals, in config order) into ``model``."""
        self._write(model, self.merged_tensors(base, members))

    def write_fixed(
        self, model: torch.nn.Module, base: ModelTensors | None, members: Sequence[ModelTensors]
    ) -> None:
        """Write the tensors that do not depend on the population into ``model`` (once)."""
        self._write(model, self.merged_tensors(base, members, fixed=True))

    def write_tensors(
        self, model: torch.nn.Module, tensors: ModelTensors, device: torch.device | str
    ) -> None:
        """Write one model's tensors by their stored names (an individual alone) into
        ``model``, read onto ``device``."""
        self._write(model, ((name, tensors.get(name, device)) for name in tensors.names))

    def _write(self, model: torch.nn.Module, merged: Iterator[tuple[str, torch.Tensor]]) -> None:
        params = named_tensors(model)
        missing = []
        for name, value in merged:
            target = params.get(name)
            if target is None:
                missing.append(name)
                continue
            if target.shape != value.shape:
                raise MergeInputError(
                    f"tensor {name}: the merge has shape {tuple(value.shape)}, the live model "
                    f"{tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(value)
        if missing and not self._missing_warned:
            self._missing_warned = True
            LOG.warning("the live model has no tensor(s) %s; they are not written", missing[:5])
