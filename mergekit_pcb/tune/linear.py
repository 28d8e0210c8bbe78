"""The PCB merge as a linear function of the per-model weights, applied in place.

Steps 1-5 of PCB do not depend on the per-model weights, so for each tensor
``theta(w) = theta_base + lambda * sum_i w_i c_i``. :func:`capture_linear_merge`
runs mergekit's own planner and loader over a ``pcb`` config once (so parameter
filters, gradients, slices and dtypes resolve exactly as ``mergekit-yaml`` will),
keeping each tensor's contributions ``c_i``. :meth:`LinearMerge.apply` then turns a
live transformers model into the merge for any weights with ``n`` multiply-adds per
tensor: no disk writes, no re-balancing.

Contributions are kept in memory, or, when they would not fit, in safetensors
shards on disk that are read back (memory-mapped) tensor by tensor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.merge_methods import TensorGroup
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mergekit_pcb.method import METHOD_NAME, capturing_contributions

LOG = logging.getLogger(__name__)

_SHARD_BYTES = 1 << 30


@dataclass
class _LinearTensor:
    """One tensor's merge: ``base + lam * sum_i coeffs[model_index[i]] * c_i``."""

    base: torch.Tensor
    lam: float
    model_index: tuple[int, ...]
    contributions: torch.Tensor | None  # None: stored on disk under the tensor's name


class _ShardWriter:
    """Accumulates contributions and writes them as safetensors shards of ~1 GiB."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.location: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous().cpu()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = os.path.join(
            self.directory, f"contributions-{len(set(self.location.values())):05d}.safetensors"
        )
        save_file(self.pending, path)
        self.location.update({name: path for name in self.pending})
        self.pending, self.pending_bytes = {}, 0


class LinearMerge:
    """Per-tensor contributions of a ``pcb`` config, applicable to a live model."""

    def __init__(
        self,
        model_names: Sequence[str],
        tensors: dict[str, _LinearTensor],
        fixed: dict[str, torch.Tensor],
        shard_location: dict[str, str] | None = None,
    ):
        self.model_names = list(model_names)
        self.tensors = tensors
        self.fixed = fixed  # tensors mergekit produces without pcb (buffers, passthrough)
        self._shard_location = shard_location or {}
        self._open: dict[str, object] = {}

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    def _contributions(self, name: str, entry: _LinearTensor) -> torch.Tensor:
        if entry.contributions is not None:
            return entry.contributions
        path = self._shard_location[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt", device=str(entry.base.device))
        return self._open[path].get_tensor(name)

    def merged_tensor(self, name: str, coefficients: Sequence[float]) -> torch.Tensor:
        """The merged tensor ``name`` for these per-model weights, float32."""
        entry = self.tensors[name]
        contributions = self._contributions(name, entry)
        weights = torch.tensor(
            [float(coefficients[i]) for i in entry.model_index],
            dtype=torch.float32,
            device=contributions.device,
        )
        merged = torch.tensordot(weights, contributions, dims=1)
        return merged.mul_(entry.lam).add_(entry.base)

    def apply(self, model: torch.nn.Module, coefficients: Sequence[float]) -> None:
        """Write the merge for ``coefficients`` (one per model) into ``model`` in place."""
        if len(coefficients) != self.n_models:
            raise ValueError(f"expected {self.n_models} coefficients, got {len(coefficients)}")
        params = _named_tensors(model)
        with torch.no_grad():
            for name in self.tensors:
                target = params.get(name)
                if target is not None:
                    target.copy_(self.merged_tensor(name, coefficients))

    def load_fixed(self, model: torch.nn.Module) -> None:
        """Copy the tensors that do not depend on the weights into ``model``."""
        params = _named_tensors(model)
        missing = [n for n in [*self.tensors, *self.fixed] if n not in params]
        if missing:
            LOG.warning("the live model has no tensor(s) %s; they are not tuned", missing[:5])
        with torch.no_grad():
            for name, value in self.fixed.items():
                if name in params:
                    params[name].copy_(value)


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_buffers())
    named.update({name: p.data for name, p in model.named_parameters(remove_duplicate=False)})
    return named


def tuned_model_names(config: MergeConfiguration) -> list[str]:
    """The models that get a coefficient: the config's models other than the base."""
    if config.merge_method != METHOD_NAME:
        raise ValueError(f"the tuner needs merge_method: {METHOD_NAME}, got {config.merge_method}")
    if not config.models:
        raise ValueError(
            "the tuner needs a config with a 'models:' list (slices are not supported)"
        )
    base = str(config.base_model) if config.base_model else None
    names = [str(m.model) for m in config.models if str(m.model) != base]
    if not names:
        raise ValueError("the config has no model besides the base to tune")
    return names


def capture_linear_merge(
    config: MergeConfiguration,
    options: MergeOptions | None = None,
    *,
    cache_dir: str | None = None,
) -> LinearMerge:
    """Run mergekit's planner over ``config`` once and keep every tensor's contributions.

    With ``cache_dir``, contributions go to safetensors shards there instead of memory.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config

    options = options or MergeOptions(quiet=True)
    names = tuned_model_names(config)
    index_of = {name: i for i, name in enumerate(names)}
    config = config.model_copy(deep=True)  # the planner normalises it in place
    arch_info = get_architecture_info(config, options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # mergekit 0.1.5's plan_in_memory() fails validating ReturnTensor, so run the
    # per-tensor tasks of the plan directly (what plan_in_memory would wrap).
    planner._plan()
    tasks = [task for _weight, task in planner._tensors]

    tensors: dict[str, _LinearTensor] = {}
    writer = _ShardWriter(cache_dir) if cache_dir else None

    def sink(name: str, group: TensorGroup, contributions: torch.Tensor, lam: float) -> None:
        model_index = tuple(index_of[str(entry.id)] for entry in group.non_base)
        stored = contributions
        if writer is not None:
            writer.add(name, contributions)
            stored = None
        tensors[name] = _LinearTensor(group.base.tensor, float(lam), model_index, stored)

    fixed: dict[str, torch.Tensor] = {}
    executor = Executor(tasks, math_device=options.device, storage_device=options.device)
    with capturing_contributions(sink):
        for task, value in tqdm(
            executor.run(quiet=True),
            total=len(tasks),
            desc="PCB contributions",
            disable=options.quiet,
        ):
            name = task.output_weight.name
            if name not in tensors and value is not None:
                fixed[name] = value
    if writer is not None:
        writer.flush()
    LOG.info("captured contributions of %d tensors for %d models", len(tensors), len(names))
    return LinearMerge(names, tensors, fixed, writer.location if writer else None)
