"""Training data order that a resumed run can continue in the middle of an epoch.

Resuming bit for bit needs the batches after the checkpoint to be the ones an
uninterrupted run would have drawn. `ResumableSampler` shuffles with a generator seeded
from (seed, epoch), never from the global random state. `ResumableTrainOrder`, a mixin
for datamodules, stores the epoch and the number of batches already trained in the
checkpoint (Lightning saves a datamodule's state_dict), and on resume has the sampler
skip the batches the run has trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start one epoch after its first `skip` samples.

    With num_replicas=1 it is a plain seeded shuffle. Being a DistributedSampler, Lightning
    keeps it under DDP instead of wrapping it in a sampler of its own.

    `current_epoch`, when given, returns the epoch to shuffle for and overrides the value
    Lightning passes to set_epoch(): after resuming from a checkpoint saved at the end of an
    epoch's validation, Lightning 2.6 passes the epoch number plus one.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        current_epoch: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.current_epoch = current_epoch
        self._resume_epoch: int | None = None
        self._resume_skip = 0

    def resume_from(self, epoch: int, num_samples_done: int) -> None:
        """Skip the first `num_samples_done` samples of this process when `epoch` is iterated."""
        self._resume_epoch = epoch
        self._resume_skip = num_samples_done

    def __iter__(self) -> Iterator[int]:
        if self.current_epoch is not None:
            self.epoch = self.current_epoch()
        indices = list(super().__iter__())
        if self._resume_epoch == self.epoch:
            indices = indices[self._resume_skip :]
        self._resume_epoch = None
        return iter(indices)


class ResumableTrainOrder:
    """Mixin for a LightningDataModule whose training batches continue exactly on resume.

    The datamodule builds its training loader with `resumable_train_loader`. Its state in a
    checkpoint is the epoch and the number of batches trained in it. The count comes from
    the trainer, because the loader itself runs ahead of training when it prefetches.
    Lightning restores a datamodule's state before it builds the loaders.
    """

    trainer: Any
    _train_sampler: ResumableSampler | None = None
    _train_resume_state: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        if self._train_sampler is None or self.trainer is None:
            return {}
        fit_loop = self.trainer.fit_loop
        epochs = fit_loop.epoch_progress.current
        # Between epochs (when one starts, or after the last) no batch of the next is done.
        in_epoch = epochs.started > epochs.processed
        batches_done = fit_loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        return {"epoch": self.trainer.current_epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._train_resume_state = dict(state_dict) or None

    def resumable_train_loader(
        self, dataset: Dataset, batch_size: int, **kwargs: Any
    ) -> DataLoader:
        """Build the training loader: a seeded shuffle, split between processes under DDP."""
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        # torch.initial_seed() is the seed given to seed_everything (train.py seeds first).
        seed = torch.initial_seed() % 2**63
        if world_size > 1:
            # The processes must shuffle alike to split the data between them. Without a
            # seed (seed=null) their initial seeds differ, so rank 0's is used everywhere.
            seed = trainer.strategy.broadcast(seed, src=0)
        sampler = ResumableSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            seed=seed,
            current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
        )
        if self._train_resume_state is not None:
            state = self._train_resume_state
            sampler.resume_from(state["epoch"], state["batches_done"] * batch_size)
            self._train_resume_state = None
        self._train_sampler = sampler
        # The loader's own generator draws the worker seeds, which would otherwise come from
        # (and advance) torch's global random state every time an epoch starts.
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs
        )
