"""Training data helpers: validation split and spatially contiguous section crops."""

from __future__ import annotations

import numpy as np
import torch
from stgen.errors import InputError


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``n`` spots (validation >= 1 spot when n >= 2)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = min(max(1, int(round(fraction * n))), n - 1) if n >= 2 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# -------------------------------------------------------------------------- FLAG
class FlagCrops(torch.utils.data.Dataset):
    """``length`` random training items: spatially contiguous crops of training sections.

    An item is the ``crop_spots`` spots nearest (in pixels) to a random centre
    spot of a section drawn with probability proportional to its spot count
    (the whole section when it is smaller), as a dict ``feats (M, F)``, ``x0``
    (M, G) normalised targets, ``graph`` (the section graph restricted to the
    crop, :meth:`SpotGraph.subgraph`), ``loss_mask`` (M,) bool (training
    spots; held-out validation spots stay in the crop and the graph) and, when
    the section has them, ``align`` (M, G', E) contextual alignment targets. The
    crops come from one seeded generator (``num_workers=0``), or with ``keyed``
    item ``i`` is drawn from its own generator seeded by ``(seed, i)`` (FLAG,
    with the item keys of :class:`EpochSampler`: resumable, one crop stream per process).
    """

    def __init__(self, sections: list[dict], crop_spots: int, length: int, seed: int, keyed: bool = False) -> None:
        if crop_spots < 1:
            raise InputError(f"flag.crop_spots must be >= 1, got {crop_spots}")
        self.sections, self.crop, self.length = sections, int(crop_spots), int(length)
        sizes = np.array([len(s["xy"]) for s in sections], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.seed, self.keyed = int(seed), keyed
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)]) if self.keyed else self.rng
        s = self.sections[int(rng.choice(len(self.sections), p=self.p))]
        xy = s["xy"]
        if len(xy) <= self.crop:
            idx = np.arange(len(xy))
        else:
            d2 = ((xy - xy[rng.integers(len(xy))]) ** 2).sum(1)
            idx = np.sort(np.argpartition(d2, self.crop - 1)[: self.crop])
        idx = torch.from_numpy(idx)
        item = {"feats": s["feats"][idx], "x0": s["x0"][idx], "graph": s["graph"].subgraph(idx),
                "loss_mask": s["train_mask"][idx]}
        if "align" in s:  # per-spot contextual alignment targets (FLAG)
            item["align"] = s["align"][idx]
        return item
