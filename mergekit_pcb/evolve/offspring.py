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
* a tensor's crossover mask: drawn on the CPU from numpy's PCG64 generator seeded from
  ``(seed, generation, individual, tensor name)`` (:func:`mask_seed`), in fixed chunks,
  then moved to the tensor's device as one byte per entry. The mask is therefore the
  same whatever device the individuals live on; ``u`` is the same bit for bit on one
  device. (On a GPU the draws stay the CPU's work; the mixing is the GPU's.)

**The mask's resolution.** Each entry's draw is a 16-bit lane of the generator's raw
64-bit words, ``U`` uniform on ``{0, ..., 65535}``, and ``m = U < round(cr * 65536)``: a
Bernoulli draw of probability ``round(cr * 65536) / 65536``, which is ``cr`` exactly for
``cr = 0.5`` (and every multiple of 2^-16) and within 2^-17 of it otherwise. Four entries
per raw word make the draws about five times cheaper than a float per entry (the draws
were most of an offspring's time).

Keys are hashed by numpy's ``SeedSequence`` (a documented, version-stable hash), one
domain per kind of draw, so that no two draws share a stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

#: Entries whose mask is drawn at a time: bounds one tensor's float32 temporaries to a
#: few times 16 MiB. A mask is the generator's stream in entry order, drawn the same in
#: one piece or in chunks (tested) as long as a chunk is a whole number of raw words, so
#: this size is free but for that.
MASK_CHUNK = 1 << 22
#: Bits of one entry's draw (see the module): four entries per raw 64-bit word.
MASK_BITS = 16
_LANES = 64 // MASK_BITS

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


def mask_threshold(cr: float) -> int:
    """The lane value below which an entry is crossed: ``P(m = 1) = threshold / 2^16``."""
    return round(cr * (1 << MASK_BITS))


class _MaskStream:
    """Successive pieces of one tensor's crossover mask (CPU, bool), in entry order."""

    def __init__(self, seed: int, cr: float):
        self.bits = np.random.PCG64(seed)
        self.threshold = mask_threshold(cr)

    def next(self, k: int) -> torch.Tensor:
        if MASK_CHUNK % _LANES:
            raise ValueError(f"MASK_CHUNK must be a multiple of {_LANES}")
        words = self.bits.random_raw(-(-k // _LANES))
        if self.threshold >= 1 << MASK_BITS:  # cr = 1: every entry (the draws still taken)
            return torch.ones(k, dtype=torch.bool)
        # Little-endian lanes, so the mask is the same on any machine.
        lanes = words.astype("<u8", copy=False).view("<u2")[:k]
        return torch.from_numpy(lanes < self.threshold)


def crossover_mask(numel: int, cr: float, seed: int) -> torch.Tensor:
    """The whole crossover mask of a tensor of ``numel`` entries (CPU, bool), as
    :func:`mix` draws it chunk by chunk; ``seed`` comes from :func:`mask_seed`."""
    stream = _MaskStream(seed, cr)
    mask = torch.empty(numel, dtype=torch.bool)
    for start in range(0, numel, MASK_CHUNK):
        part = stream.next(min(MASK_CHUNK, numel - start))
        mask[start : start + part.numel()] = part
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
    stream = _MaskStream(seed, cr)
    size = min(MASK_CHUNK, numel)
    # Two float32 work buffers of one chunk, reused: x_i (then u) and x_r - x_i (then
    # m (x_r - x_i)).
    mixed = torch.empty(size, dtype=torch.float32, device=parent.device)
    step = torch.empty(size, dtype=torch.float32, device=parent.device)
    for start in range(0, numel, MASK_CHUNK):
        stop = min(start + MASK_CHUNK, numel)
        k = stop - start
        mask = stream.next(k).to(parent.device)
        x_i, delta = mixed[:k], step[:k]
        x_i.copy_(flat_parent[start:stop])
        delta.copy_(flat_partner[start:stop]).sub_(x_i).mul_(mask)
        x_i.add_(delta, alpha=f)
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
