"""The merge as a function of the per-model weights, stored compactly and applied in place.

For every method the tuner accepts, each tensor of the merge is

    theta(w) = base + lam * sum_i w_i c_i / D(w)

with ``D(w) = 1``, or ``sum_i w_i`` over the models present in the tensor when the
method normalises (``task_arithmetic``/``linear`` with ``normalize: true``). A
:class:`TensorTerms` holds one tensor's ``base``, ``lam``, the models present and
their contributions ``c_i`` as :class:`~mergekit_pcb.tune.compact.CompactRow`;
:class:`Contributions` holds every tensor's and writes the merge for any weights
into a live model: a few streaming adds per tensor, no disk writes, no re-balancing.

Where they live (``placement.py`` chooses): beside the parameter they update (its GPU,
or the CPU), else in CPU memory, else in safetensors shards on disk (:class:`DiskStore`),
read back (memory-mapped) tensor by tensor for every candidate.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_pcb.tune.compact import CompactRow
from mergekit_pcb.tune.weight_layout import WeightLayout

if TYPE_CHECKING:
    from mergekit_pcb.tune.placement import Placement

LOG = logging.getLogger(__name__)

_SHARD_BYTES = 1 << 30
#: mergekit's ``task_arithmetic`` replaces a sum of weights below this by 1.
_GUARD = 1e-8

Normalize = Literal["none", "guarded", "plain"]


@dataclass
class TensorTerms:
    """One tensor: ``base + lam * sum_i w_i c_i / D(w)`` (see the module docstring).

    ``rows`` maps a model's index to its contribution; a model present in the tensor
    but absent from ``rows`` contributes zero (it left the tensor unchanged).
    ``normalize``: ``none`` (D = 1), ``guarded`` (mergekit's task arithmetic: a sum
    below 1e-8 in magnitude counts as 1) or ``plain`` (mergekit's linear).
    """

    shape: torch.Size
    base: torch.Tensor | None  # the base model's tensor (None: linear, which has none)
    lam: float
    members: tuple[int, ...]
    rows: dict[int, CompactRow]
    normalize: Normalize = "none"
    on_disk: bool = False  # rows and base are in the disk shards (here: placeholders)
    #: Set for ``task_arithmetic`` in bf16/fp16: mergekit then computes in that dtype,
    #: rounding at every step, and a candidate must round the same way to equal it.
    half_precision: torch.dtype | None = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def stored_bytes(self) -> int:
        """Bytes stored for this tensor: its rows and its base."""
        base = 0 if self.base is None else self.base.numel() * self.base.element_size()
        return base + sum(row.nbytes for row in self.rows.values())

    def to(self, device: torch.device | str, copy: bool = True) -> TensorTerms:
        """These terms with the rows and the base on ``device``; ``copy``: the base is
        copied even where it is on ``device`` already."""
        base = None if self.base is None else self.base.to(device, copy=copy)
        rows = {index: row.to(device) for index, row in self.rows.items()}
        return replace(self, base=base, rows=rows)

    def divisor(self, weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """``D(w)`` as mergekit computes it: the weights' sum in ``dtype``."""
        total = torch.tensor([float(weights[i]) for i in self.members], dtype=dtype).sum()
        if self.normalize == "guarded" and total.abs() < _GUARD:
            return torch.ones((), dtype=dtype)
        return total


class DiskStore:
    """Terms kept in safetensors shards of ~1 GiB, read back memory-mapped per candidate."""

    def __init__(self, directory: str):
        self.directory = directory
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.location: dict[str, str] = {}
        self.files = 0
        self._open: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def add(self, name: str, terms: TensorTerms) -> TensorTerms:
        """Store ``terms``; return placeholders (``meta`` tensors) that stand for them."""
        for key, tensor in self._tensors(name, terms):
            self.pending[key] = tensor.contiguous().cpu()
        self.pending_bytes += terms.stored_bytes
        if self.pending_bytes >= _SHARD_BYTES:
            self.flush()
        return replace(terms.to("meta"), on_disk=True)

    @staticmethod
    def _tensors(name: str, terms: TensorTerms):
        if terms.base is not None:
            yield f"{name}|base", terms.base
        for index, row in terms.rows.items():
            yield f"{name}|{index}|values", row.values
            if row.gaps is not None:
                yield f"{name}|{index}|gaps", row.gaps

    def flush(self) -> None:
        if not self.pending:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"contributions-{self.files:05d}.safetensors")
        save_file(self.pending, path)
        self.files += 1
        self.location.update({key: path for key in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def load(self, name: str, terms: TensorTerms, device: torch.device) -> TensorTerms:
        """The stored terms for the placeholders ``terms``, read onto ``device``."""
        with self._lock:
            base = None if terms.base is None else self._get(f"{name}|base", device)
            rows = {}
            for index, row in terms.rows.items():
                gaps = None if row.gaps is None else self._get(f"{name}|{index}|gaps", device)
                values = self._get(f"{name}|{index}|values", device)
                rows[index] = CompactRow(row.numel, values, gaps)
        return replace(terms, base=base, rows=rows, on_disk=False)

    def _get(self, key: str, device: torch.device) -> torch.Tensor:
        handle_key = (self.location[key], str(device))
        if handle_key not in self._open:
            self._open[handle_key] = safe_open(
                self.location[key], framework="pt", device=str(device)
            )
        return self._open[handle_key].get_tensor(key)


class Contributions:
    """Every tensor's :class:`TensorTerms` for a config, applicable to a live model."""

    def __init__(
        self,
        model_names: Sequence[str],
        method: str,
        terms: dict[str, TensorTerms],
        fixed: dict[str, torch.Tensor],
        *,
        layout: WeightLayout | None = None,
        disk: DiskStore | None = None,
        placement: Placement | None = None,
    ):
        self.model_names = list(model_names)
        self.method = method
        self.terms = terms
        self.fixed = fixed  # tensors that do not depend on the weights (buffers)
        # The searched numbers, and each tensor's weights for them (default: one per model).
        self.layout = layout or WeightLayout([1.0] * len(self.model_names), self.model_names)
        self.disk = disk  # where terms placed on disk are (None: nowhere)
        self.placement = placement

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    @property
    def row_bytes(self) -> int:
        """Bytes of the stored contributions (the rows only: not the bases)."""
        return sum(row.nbytes for terms in self.terms.values() for row in terms.rows.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes stored in all: the contributions and the base's tensors."""
        return sum(terms.stored_bytes for terms in self.terms.values())

    @property
    def bytes_per_parameter_per_model(self) -> float:
        parameters = sum(terms.numel for terms in self.terms.values())
        return self.row_bytes / max(1, parameters * self.n_models)

    def _terms_on(self, name: str, device: torch.device) -> TensorTerms:
        """Tensor ``name``'s terms on ``device`` (read from disk, or moved, if need be)."""
        terms = self.terms[name]
        if terms.on_disk:
            assert self.disk is not None
            return self.disk.load(name, terms, device)
        # Terms kept in CPU memory for a parameter on a GPU travel to it per candidate.
        if terms.base is not None and terms.base.device != device:
            return terms.to(device)
        if any(row.device != device for row in terms.rows.values()):
            return terms.to(device)
        return terms

    def write_tensor(self, name: str, weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
        """Write tensor ``name``'s merge for ``weights`` into the flat float32 ``out``."""
        terms = self._terms_on(name, out.device)
        if terms.half_precision is not None:
            return _task_arithmetic_in(terms.half_precision, terms, weights, out)
        # In mergekit's order (weighted sum, division, lambda, base), so that a sum that
        # cancels to near zero rounds as it does there.
        out.zero_()
        for index, row in terms.rows.items():
            row.add_to(out, float(weights[index]))
        if terms.normalize != "none":
            out.div_(terms.divisor(weights, torch.float32).to(out.device))
        if terms.lam != 1:
            out.mul_(terms.lam)
        if terms.base is not None:
            _add_converted(out, terms.base.reshape(-1))
        return out

    def merged_tensor(self, name: str, numbers: Sequence[float]) -> torch.Tensor:
        """Tensor ``name`` of the merge for the searched ``numbers`` (see :attr:`layout`),
        float32, on its rows' device."""
        weights = self.layout.tensor_weights(name, numbers)
        terms = self.terms[name]
        rows = list(terms.rows.values())
        stored = terms.base if terms.base is not None else rows[0].values if rows else None
        device = "cpu" if stored is None or stored.device.type == "meta" else stored.device
        out = torch.empty(terms.numel, dtype=torch.float32, device=device)
        return self.write_tensor(name, weights, out).reshape(terms.shape)

    def apply(self, model: torch.nn.Module, numbers: Sequence[float]) -> None:
        """Write the merge for the searched ``numbers`` into ``model`` in place: one
        weight per model, or the numbers of the config's weight settings (:attr:`layout`)."""
        if len(numbers) != self.layout.size:
            raise ValueError(f"expected {self.layout.size} weights, got {len(numbers)}")
        params = named_tensors(model)
        scratch: dict[torch.device, torch.Tensor] = {}
        with torch.no_grad():
            for name, terms in self.terms.items():
                target = params.get(name)
                if target is None:
                    continue
                buffer = scratch.get(target.device)
                if buffer is None or buffer.numel() < terms.numel:
                    buffer = torch.empty(
                        max(t.numel for t in self.terms.values()),
                        dtype=torch.float32,
                        device=target.device,
                    )
                    scratch[target.device] = buffer
                weights = self.layout.tensor_weights(name, numbers)
                out = self.write_tensor(name, weights, buffer[: terms.numel])
                target.copy_(out.view(terms.shape))

    def scorer(
        self, model: torch.nn.Module, tokenizer: Any, objective: Callable[[Any, Any], float]
    ) -> Callable[[Sequence[float], dict[str, float]], float]:
        """The tuner's evaluation of a candidate: its merge written into ``model`` in
        place, then ``objective(model, tokenizer)``, timed alone into
        ``timings["objective"]`` (the search's ``Evaluate``)."""

        def evaluate(weights: Sequence[float], timings: dict[str, float]) -> float:
            self.apply(model, weights)
            began = time.perf_counter()
            try:
                return float(objective(model, tokenizer))
            finally:
                timings["objective"] = time.perf_counter() - began

        return evaluate

    def load_fixed(self, model: torch.nn.Module) -> None:
        """Copy the tensors that do not depend on the weights into ``model``."""
        params = named_tensors(model)
        missing = [n for n in [*self.terms, *self.fixed] if n not in params]
        if missing:
            LOG.warning("the live model has no tensor(s) %s; they are not tuned", missing[:5])
        with torch.no_grad():
            for name, value in self.fixed.items():
                if name in params:
                    params[name].copy_(value)


#: Entries converted at a time by ``_add_converted`` (4 MiB of float32: cache-sized).
_CONVERT_CHUNK = 1 << 20


def _add_converted(out: torch.Tensor, other: torch.Tensor) -> None:
    """``out += other`` for a flat float32 ``out`` and a flat ``other`` of any dtype.

    On the CPU torch's add of a bf16 tensor into a float32 one runs element by element,
    several times slower than a conversion and a float32 add (16.8M entries on 2
    cores: 28 ms against 7), and the base's add was about 40% of a candidate. So a
    CPU ``other`` of another dtype is converted a chunk at a time into a small buffer;
    the sum is the same, float32 holding every bf16/fp16 value exactly.
    """
    if other.dtype == out.dtype or out.device.type != "cpu":
        out.add_(other)
        return
    buffer = torch.empty(min(_CONVERT_CHUNK, out.numel()), dtype=out.dtype)
    for start in range(0, out.numel(), _CONVERT_CHUNK):
        part = other[start : start + _CONVERT_CHUNK]
        out[start : start + part.numel()].add_(buffer[: part.numel()].copy_(part))


def _task_arithmetic_in(
    dtype: torch.dtype, terms: TensorTerms, weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """mergekit's ``task_arithmetic`` step by step in ``dtype``, into float32 ``out``.

    As ``GeneralizedTaskArithmeticMerge.merge_group`` does for half-precision inputs:
    the weights are cast to the deltas' dtype, each weighted delta is rounded, their
    sum is rounded once, then the division by the sum of weights, the product with
    ``lambda`` and the addition of the base are each rounded.
    """
    w = torch.tensor([float(weights[i]) for i in terms.members], dtype=dtype)
    by_model = dict(zip(terms.members, w.to(out.device), strict=True))
    out.zero_()
    for index, row in terms.rows.items():
        out.add_((row.dense().to(dtype) * by_model[index]).float())
    mixed = out.to(dtype)
    if terms.normalize != "none":
        mixed /= terms.divisor(weights, dtype).to(out.device)
    if terms.lam != 1:
        mixed *= terms.lam
    return out.copy_(terms.base.reshape(-1) + mixed)


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its state-dict name (tied ones too)."""
    named = dict(model.named_buffers())
    named.update({name: p.data for name, p in model.named_parameters(remove_duplicate=False)})
    return named
