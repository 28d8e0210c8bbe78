"""The merge as a function of the per-model weights, stored compactly and applied in place.

For every method the tuner accepts, each tensor of the merge is

    theta(w) = anchor + lam * sum_i w_i c_i / D(w)

with ``D(w) = 1``, or ``sum_i w_i`` over the models present in the tensor when the
method normalises (``task_arithmetic``/``linear`` with ``normalize: true``). A
:class:`TensorTerms` holds one tensor's ``anchor``, ``lam``, the models present and
their contributions ``c_i`` as :class:`~mergekit_pcb.tune.compact.CompactRow`;
:class:`Contributions` holds every tensor's and writes the merge for any weights
into a live model: a few streaming adds per tensor, no disk writes, no re-balancing.

Where they live (:class:`Placement`): beside the parameter they update (its GPU, or
the CPU), else in CPU memory, else in safetensors shards on disk, read back
(memory-mapped) tensor by tensor for every candidate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_pcb.tune.compact import CompactRow

LOG = logging.getLogger(__name__)

_SHARD_BYTES = 1 << 30
#: mergekit's ``task_arithmetic`` replaces a sum of weights below this by 1.
_GUARD = 1e-8

Normalize = Literal["none", "guarded", "plain"]
PlacementMode = Literal["auto", "device", "cpu", "disk"]


@dataclass
class TensorTerms:
    """One tensor: ``anchor + lam * sum_i w_i c_i / D(w)`` (see the module docstring).

    ``rows`` maps a model's index to its contribution; a model present in the tensor
    but absent from ``rows`` contributes zero (it left the tensor unchanged).
    ``normalize``: ``none`` (D = 1), ``guarded`` (mergekit's task arithmetic: a sum
    below 1e-8 in magnitude counts as 1) or ``plain`` (mergekit's linear).
    """

    shape: torch.Size
    anchor: torch.Tensor | None
    lam: float
    members: tuple[int, ...]
    rows: dict[int, CompactRow]
    normalize: Normalize = "none"
    where: str = "memory"  # "memory" or "disk" (rows stored in the disk shards)
    #: Set for ``task_arithmetic`` in bf16/fp16: mergekit then computes in that dtype,
    #: rounding at every step, and a candidate must round the same way to equal it.
    half_precision: torch.dtype | None = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def divisor(self, weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """``D(w)`` as mergekit computes it: the weights' sum in ``dtype``."""
        total = torch.tensor([float(weights[i]) for i in self.members], dtype=dtype).sum()
        if self.normalize == "guarded" and total.abs() < _GUARD:
            return torch.ones((), dtype=dtype)
        return total


@dataclass
class Placement:
    """Chooses where each tensor's contributions live, within byte budgets per device.

    ``mode``: ``device`` keeps them beside their parameter, ``cpu`` in CPU memory,
    ``disk`` on disk; ``auto`` beside the parameter while that device's budget lasts,
    then in CPU memory while its budget lasts, then on disk.
    """

    mode: PlacementMode = "auto"
    budgets: dict[str, int] = field(default_factory=dict)  # bytes left, per device name
    used: Counter = field(default_factory=Counter)

    def choose(self, nbytes: int, device: torch.device | str) -> str:
        """A device name (``cuda:0``, ``cpu``) or ``disk`` for ``nbytes`` of rows."""
        device = str(device)
        if self.mode == "disk":
            target = "disk"
        elif self.mode == "cpu":
            target = "cpu"
        elif self.mode == "device":
            target = device
        else:
            target = next(
                (d for d in dict.fromkeys((device, "cpu")) if self.budgets.get(d, 0) >= nbytes),
                "disk",
            )
        if target in self.budgets:
            self.budgets[target] -= nbytes
        self.used[target] += nbytes
        return target

    def describe(self) -> str:
        parts = [f"{_gib(n)} on {where}" for where, n in sorted(self.used.items()) if n]
        left = [
            f"{_gib(n)} left free on {d}" for d, n in sorted(self.budgets.items()) if d != "cpu"
        ]
        return ", ".join(parts + left) or "nothing stored"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


class _DiskRows:
    """Rows kept in safetensors shards of ~1 GiB, read back memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.location: dict[str, str] = {}
        self.files = 0
        self._open: dict[tuple[str, str], object] = {}

    @staticmethod
    def _keys(name: str, index: int) -> tuple[str, str]:
        return f"{name}|{index}|values", f"{name}|{index}|gaps"

    def add(self, name: str, rows: Mapping[int, CompactRow]) -> None:
        for index, row in rows.items():
            values_key, gaps_key = self._keys(name, index)
            self.pending[values_key] = row.values.contiguous().cpu()
            if row.gaps is not None:
                self.pending[gaps_key] = row.gaps.contiguous().cpu()
            self.pending_bytes += row.nbytes
        if self.pending_bytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"contributions-{self.files:05d}.safetensors")
        save_file(self.pending, path)
        self.files += 1
        self.location.update({key: path for key in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def rows(self, name: str, terms: TensorTerms, device: torch.device) -> dict[int, CompactRow]:
        out = {}
        for index, row in terms.rows.items():
            values_key, gaps_key = self._keys(name, index)
            values = self._get(values_key, device)
            gaps = self._get(gaps_key, device) if gaps_key in self.location else None
            out[index] = CompactRow(row.numel, values, gaps)
        return out

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
        config_weights: Sequence[float | None] | None = None,
        disk: _DiskRows | None = None,
        placement: Placement | None = None,
    ):
        self.model_names = list(model_names)
        self.method = method
        self.terms = terms
        self.fixed = fixed  # tensors that do not depend on the weights (buffers)
        # Each model's weight as the config resolves it (None: it varies by tensor).
        self.config_weights = list(config_weights or [None] * len(self.model_names))
        self._disk = disk
        self.placement = placement
        self._lock = threading.Lock()

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored contributions (rows only: not the anchors)."""
        return sum(row.nbytes for terms in self.terms.values() for row in terms.rows.values())

    @property
    def bytes_per_parameter_per_model(self) -> float:
        parameters = sum(terms.numel for terms in self.terms.values())
        return self.nbytes / max(1, parameters * self.n_models)

    def _rows(self, name: str, terms: TensorTerms, device: torch.device) -> dict[int, CompactRow]:
        if terms.where == "disk":
            assert self._disk is not None
            with self._lock:
                return self._disk.rows(name, terms, device)
        # Rows kept in CPU memory for a parameter on a GPU travel to it per candidate.
        return {i: row if row.device == device else row.to(device) for i, row in terms.rows.items()}

    def merge_into(self, name: str, weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
        """Write tensor ``name``'s merge for ``weights`` into the flat float32 ``out``."""
        terms = self.terms[name]
        rows = self._rows(name, terms, out.device)
        if terms.half_precision is not None:
            return _task_arithmetic_in(terms.half_precision, terms, rows, weights, out)
        # In mergekit's order (weighted sum, division, lambda, base), so that a sum that
        # cancels to near zero rounds as it does there.
        out.zero_()
        for index, row in rows.items():
            row.add_to(out, float(weights[index]))
        if terms.normalize != "none":
            out.div_(terms.divisor(weights, torch.float32).to(out.device))
        if terms.lam != 1:
            out.mul_(terms.lam)
        if terms.anchor is not None:
            out.add_(terms.anchor.reshape(-1))
        return out

    def merged_tensor(self, name: str, weights: Sequence[float]) -> torch.Tensor:
        """Tensor ``name`` of the merge for ``weights``, float32, on its rows' device."""
        terms = self.terms[name]
        device = terms.anchor.device if terms.anchor is not None else "cpu"
        out = torch.empty(terms.numel, dtype=torch.float32, device=device)
        return self.merge_into(name, weights, out).reshape(terms.shape)

    def apply(self, model: torch.nn.Module, weights: Sequence[float]) -> None:
        """Write the merge for ``weights`` (one per model) into ``model`` in place."""
        if len(weights) != self.n_models:
            raise ValueError(f"expected {self.n_models} weights, got {len(weights)}")
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
                out = self.merge_into(name, weights, buffer[: terms.numel])
                target.copy_(out.view(terms.shape))

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


def _task_arithmetic_in(
    dtype: torch.dtype,
    terms: TensorTerms,
    rows: Mapping[int, CompactRow],
    weights: Sequence[float],
    out: torch.Tensor,
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
    for index, row in rows.items():
        out.add_((row.dense().to(dtype) * by_model[index]).float())
    mixed = out.to(dtype)
    if terms.normalize != "none":
        mixed /= terms.divisor(weights, dtype).to(out.device)
    if terms.lam != 1:
        mixed *= terms.lam
    return out.copy_(terms.anchor.reshape(-1) + mixed)


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its state-dict name (tied ones too)."""
    named = dict(model.named_buffers())
    named.update({name: p.data for name, p in model.named_parameters(remove_duplicate=False)})
    return named
