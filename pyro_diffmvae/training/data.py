"""Training data whose order is reproducible and whose position is checkpointed (exact resume mid-epoch).

:class:`ResumableDataLoader` draws its order from :class:`EpochPermutationSampler` (a function of the
seed and the epoch only) and gives Lightning its position (epoch, batches delivered) to save in every
checkpoint: ``trainer.fit(..., ckpt_path=...)`` continues with the same batches as an uninterrupted
run. Under DDP each rank gets its own share of the data. :func:`batch_size_of` is the number of
examples in a batch of a :class:`~pyro_diffmvae.model.MultimodalVAE`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Sampler

from ..model import MultimodalVAE
from .rng import rank_and_world_size

__all__ = ["EpochPermutationSampler", "ResumableDataLoader", "batch_size_of"]


def batch_size_of(vae: MultimodalVAE, batch: Mapping) -> int:
    """The leading size of the batch's first modality (the model and guide validate the batch)."""
    for name in vae.names:
        if name in batch:
            return int(batch[name].shape[0])
    return vae.parse_batch(batch)[2]  # raises the clear error


class EpochPermutationSampler(Sampler[int]):
    """Indices ``0..n-1`` in an order that depends only on ``(seed, epoch)``, sharded across DDP ranks.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also when resuming). Under DDP
    (an initialised process group) rank ``r`` of ``W`` takes ``perm[r::W]`` of the first
    ``W·⌊n/W⌋`` indices (the ranks get disjoint shares of equal size). ``start`` skips that many of
    this rank's indices (set by :class:`ResumableDataLoader` to resume mid-epoch).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch (without the skip)."""
        rank, world = rank_and_world_size()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[: (self.n // world) * world][rank::world].tolist()

    def __len__(self) -> int:
        return self.n // rank_and_world_size()[1]

    def __iter__(self):
        return iter(self.indices()[self.start:])


class ResumableDataLoader(DataLoader):
    """A training :class:`DataLoader` whose order is reproducible and whose position is checkpointed.

    The order comes from :class:`EpochPermutationSampler` (``seed`` and the epoch; its own generator,
    so the global RNG is not touched). ``state_dict()`` / ``load_state_dict()`` make it "stateful"
    for Lightning, which saves the position (epoch, batches delivered) in every checkpoint and
    restores it on ``fit(ckpt_path=...)``: the resumed epoch continues with the next batch (the
    skipped examples are not loaded). It shards the data across DDP ranks itself: give the trainer
    ``use_distributed_sampler=False``.
    """

    def __init__(self, dataset, batch_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 **kwargs: Any):
        sampler = EpochPermutationSampler(len(dataset), seed=seed, shuffle=shuffle)
        generator = torch.Generator().manual_seed(int(seed))  # worker base seeds, without the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, generator=generator,
                         **kwargs)
        self._start = 0        # batches skipped at the start of the current pass
        self._delivered = 0    # batches yielded in the current pass
        self._pending: dict | None = None

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # runs at the first next(), i.e. after Lightning's set_epoch for this epoch
        start = 0
        if self._pending is not None and self._pending["epoch"] == self.sampler.epoch:
            start = int(self._pending["batches"])
        self._pending = None
        self.sampler.start = start * self.batch_size
        self._start, self._delivered = start, 0
        try:
            for batch in super().__iter__():
                self._delivered += 1  # counted before the batch is used: a checkpoint during its step includes it
                yield batch
        finally:
            self.sampler.start = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._start + self._delivered}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
