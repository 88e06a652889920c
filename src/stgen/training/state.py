"""Resumable randomness: seeds keyed on (seed, stream, epoch or step), the epoch sampler, global RNG states."""

from __future__ import annotations

import math
import random
import numpy as np
import torch


def key_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the non-negative integers ``keys`` (numpy ``SeedSequence`` hash):
    the randomness of a training step or epoch keyed on ``(seed, stream, epoch or step, ...)``."""
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


_ORDER, _CORRUPT, _NOISE, _GLOBAL = 1, 2, 3, 4  # key_seed streams


class EpochSampler(torch.utils.data.Sampler):
    """Training order that depends only on ``(seed, epoch)``, resumable mid-epoch.

    ``keyed=False``: a permutation of ``range(n)`` per epoch (HINGE's spots),
    the same on every process; ``keyed=True``: ``n`` item keys per epoch and
    process, ``(epoch * n + i) * world + rank`` (FLAG's crops, which
    :class:`FlagCrops` draws from the key). With ``batch_size`` it yields lists
    of ``batch_size`` consecutive indices (use as ``batch_sampler``), else single
    indices (``sampler``). Lightning calls :meth:`set_epoch` before every epoch
    (the sampler is its own ``.sampler``, where Lightning looks);
    :meth:`resume_at` skips the batches an interrupted epoch already trained.
    """

    def __init__(self, n: int, seed: int, batch_size: int | None = None, keyed: bool = False) -> None:
        self.n, self.seed, self.batch_size, self.keyed = int(n), int(seed), batch_size, keyed
        self.epoch, self.rank, self.world = 0, 0, 1
        self._resume: tuple[int, int] | None = None
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = int(rank), int(world)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches when epoch ``epoch`` is iterated next."""
        self._resume = (int(epoch), int(batches))

    def __len__(self) -> int:
        return self.n if self.batch_size is None else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The indices (item keys) of ``epoch``, in order."""
        if self.keyed:
            return [(epoch * self.n + i) * self.world + self.rank for i in range(self.n)]
        gen = torch.Generator().manual_seed(key_seed(self.seed, _ORDER, epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        order = self.order(self.epoch)
        if self.batch_size is None:
            yield from order[skip:]
        else:
            for b in range(skip, len(self)):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]


def _rng_state() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, python) as tensors and primitive containers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
