"""Offspring of two individuals by mutation and crossover, and the draws that choose them.

Pure tensor math (no mergekit, no transformers). For individuals ``x_i`` (the parent)
and ``x_r`` (its partner), per tensor and per entry:

    u = x_i + m * f * (x_r - x_i),   m ~ Bernoulli(cr)

that is, where the crossover mask ``m`` is set the entry moves a share ``f`` of the way
from ``x_i`` towards ``x_r`` (the mutant ``(1 - f) x_i + f x_r``), elsewhere it stays
``x_i``. So every entry of ``u`` lies between ``x_i`` and the mutant: evolution never
leaves the span of the fine-tunes' own entries. The mixing is done in float32 and
the result stored in the parent's dtype (a bf16 checkpoint stays bf16).

Every random choice comes from a stream keyed by the run's seed and where it is used,
never from a generator that advances with the run, so that a rerun, a resumed run
and a run on another device draw exactly the same choices:

* the order of the individuals in a generation: :func:`generation_order`;
* a parent's partner: :func:`uniform_partner`; a uniform draw: :func:`uniform`;
* a tensor's crossover mask: drawn on the CPU by a ``torch.Generator`` seeded from
  ``(seed, generation, individual, tensor name)`` (:func:`mask_seed`), in fixed chunks,
  then moved to the tensor's device. The mask is therefore the same whatever device
  the individuals live on; ``u`` is the same bit for bit on one device. (On a GPU the
  draws stay the CPU's work, one float per entry; the mixing is the GPU's.)

Keys are hashed by numpy's ``SeedSequence`` (a documented, version-stable hash), one
domain per kind of draw, so that no two draws share a stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

#: Entries whose mask is drawn at a time: bounds one tensor's float32 temporaries to a
#: few times 16 MiB. A mask is the generator's stream in entry order, which torch's CPU
#: generator draws the same in one piece or in chunks (tested), so this size is free.
MASK_CHUNK = 1 << 22

# One stream domain per kind of draw.
_ORDER, _PARTNER, _MASK, _UNIFORM = range(4)


def _words(seed: int, *key: int, count: int = 1) -> list[int]:
    """``count`` 64-bit words of the stream keyed by ``seed`` and ``key``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sequence = np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key))
    return [int(w) for w in sequence.generate_state(count, dtype=np.uint64)]


def tensor_key(name: str) -> int:
    """A tensor name as a 64-bit key (its place in a checkpoint does not matter)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def generation_order(seed: int, generation: int, n: int) -> list[int]:
    """A permutation of ``0 .. n-1``: the order in which ``generation`` visits parents."""
    keys = _words(seed, _ORDER, generation, count=n)
    return sorted(range(n), key=lambda i: (keys[i], i))


def uniform_partner(seed: int, generation: int, individual: int, n: int) -> int:
    """A partner for ``individual``, uniform among the ``n - 1`` others."""
    if n < 2:
        raise ValueError("a partner needs at least two individuals")
    if not 0 <= individual < n:
        raise ValueError(f"individual {individual} is not in 0 .. {n - 1}")
    (word,) = _words(seed, _PARTNER, generation, individual)
    pick = word % (n - 1)  # bias below 2^-60 for any realistic population
    return pick if pick < individual else pick + 1


def uniform(seed: int, generation: int, individual: int) -> float:
    """A uniform draw in [0, 1) for ``individual`` in ``generation`` (53-bit resolution)."""
    (word,) = _words(seed, _UNIFORM, generation, individual)
    return (word >> 11) / float(1 << 53)


def mask_seed(seed: int, generation: int, individual: int, name: str) -> int:
    """The seed of the CPU generator that draws tensor ``name``'s crossover mask."""
    (word,) = _words(seed, _MASK, generation, individual, tensor_key(name))
    return word


def check_rates(f: float, cr: float) -> None:
    """Refuse a mutation share ``f`` or crossover rate ``cr`` outside [0, 1]."""
    for label, value in (("f", f), ("cr", cr)):
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{label} must be in [0, 1], got {value!r}")


def _draw_mask(draws: torch.Tensor, generator: torch.Generator, cr: float) -> torch.Tensor:
    """Fill ``draws`` with ``U`` uniform on [0, 1), then with the mask ``U < cr`` as 0/1."""
    torch.rand(draws.shape, generator=generator, out=draws)
    return torch.lt(draws, cr, out=draws)


def crossover_mask(numel: int, cr: float, seed: int) -> torch.Tensor:
    """The whole crossover mask of a tensor of ``numel`` entries (CPU, bool), as
    :func:`mix` draws it chunk by chunk; ``seed`` comes from :func:`mask_seed`."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.empty(numel, dtype=torch.bool)
    draws = torch.empty(min(MASK_CHUNK, numel), dtype=torch.float32)
    for start in range(0, numel, MASK_CHUNK):
        part = _draw_mask(draws[: min(MASK_CHUNK, numel - start)], generator, cr)
        mask[start : start + part.numel()] = part.bool()
    return mask


def mix(
    parent: torch.Tensor,
    partner: torch.Tensor,
    f: float,
    cr: float,
    seed: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``u = parent + f * m * (partner - parent)`` for one tensor (see the module);
    ``seed`` (from :func:`mask_seed`) fixes the mask ``m``.

    ``out`` (same shape and dtype as ``parent``) receives ``u`` when given, and may be
    ``parent`` itself: each chunk of ``u`` is computed from the same chunk of the
    inputs before it is written. A tensor that is not floating point (a buffer) is
    copied from the parent unchanged. Outside the mask an entry is ``x_i + 0``: its
    value (a -0.0 may come out as 0.0).
    """
    if parent.shape != partner.shape:
        raise ValueError(
            f"parent and partner tensors differ in shape: {tuple(parent.shape)} and "
            f"{tuple(partner.shape)}"
        )
    if out is None:
        out = torch.empty_like(parent)
    elif out.shape != parent.shape or out.dtype != parent.dtype:
        raise ValueError("out must have the parent's shape and dtype")
    if not parent.is_floating_point():
        return out if out is parent else out.copy_(parent)
    flat_parent, flat_partner, flat_out = parent.reshape(-1), partner.reshape(-1), out.view(-1)
    numel = flat_parent.numel()
    generator = torch.Generator().manual_seed(seed)
    size = min(MASK_CHUNK, numel)
    # Three float32 work buffers of one chunk, reused: the draws (then the mask), x_i
    # (then u) and x_r - x_i. Seven passes per chunk; addcmul does the last three
    # steps in one.
    draws = torch.empty(size, dtype=torch.float32)
    mixed = torch.empty(size, dtype=torch.float32, device=parent.device)
    step = torch.empty(size, dtype=torch.float32, device=parent.device)
    for start in range(0, numel, MASK_CHUNK):
        stop = min(start + MASK_CHUNK, numel)
        k = stop - start
        mask = _draw_mask(draws[:k], generator, cr).to(parent.device)
        x_i, delta = mixed[:k], step[:k]
        x_i.copy_(flat_parent[start:stop])
        delta.copy_(flat_partner[start:stop]).sub_(x_i)
        x_i.addcmul_(delta, mask, value=f)
        flat_out[start:stop].copy_(x_i)
    return out


@dataclass(frozen=True)
class OffspringKey:
    """Everything that fixes one offspring: who mixes with whom, how, and its draws."""

    seed: int
    generation: int
    individual: int
    partner: int
    f: float = 0.5
    cr: float = 0.5

    def __post_init__(self) -> None:
        check_rates(self.f, self.cr)
        if self.individual == self.partner:
            raise ValueError(f"individual {self.individual} cannot be its own partner")

    def tensor(
        self,
        name: str,
        parent: torch.Tensor,
        partner: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` of this offspring, from the parent's and partner's."""
        seed = mask_seed(self.seed, self.generation, self.individual, name)
        return mix(parent, partner, self.f, self.cr, seed, out=out)
