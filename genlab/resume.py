"""Resuming runs: which checkpoint to continue from, exact random state, atomic checkpoints.

A resumed run reproduces an uninterrupted one bit for bit on CPU when three conditions
are met. Lightning restores the model, optimizer and loop state. The remaining batches of
the epoch are the same (datamodules/sampling.py). The random number generators are where
they were when the checkpoint was taken (`RandomStateCheckpoint`).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

RESUME_MODES = (None, "auto")


def resolve_ckpt_path(resume: str | None, ckpt_path: str | None, run_dir: Path) -> str | None:
    """Return the checkpoint this run starts from, or None to start fresh.

    An explicit ckpt_path wins. With resume="auto" the run continues from
    `<run_dir>/checkpoints/last.ckpt`, or from the newest checkpoint there when last.ckpt is
    missing, and starts fresh when there is none. A job that SLURM requeued
    (SLURM_RESTART_COUNT >= 1) resumes as with resume="auto".
    """
    if ckpt_path is not None:
        return ckpt_path
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if resume != "auto" and not requeued:
        return None
    checkpoint_dir = run_dir / "checkpoints"
    last = checkpoint_dir / "last.ckpt"
    if last.is_file():
        return str(last)
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    if candidates:
        return str(candidates[-1])
    log.info("No checkpoint in %s yet: the run starts from the beginning", checkpoint_dir)
    return None


class RandomStateCheckpoint(Callback):
    """Keep the random number generators' state of training in checkpoints, exactly.

    Training randomness (dropout, latent noise) should depend only on the training steps.
    Between two steps Lightning and the modules may draw random numbers of their own:
    validation, a new epoch's data iterators, sample images. So the state is recorded at
    the end of each training step and put back at the start of the next one, which makes
    whatever runs in between neutral. Checkpoints store that recorded state, and a resumed
    run applies it before its first step, where the uninterrupted run applied it too.

    Under DDP every process starts from the same seed, which would give all of them the
    same latent noise and dropout masks. So when training starts, and again after a resume
    (the checkpoint contains rank 0's state), each process moves to a stream of its own,
    seeded from the shared state and its rank.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._separate_ranks = False

    def state_dict(self) -> dict[str, Any]:
        return self._state if self._state is not None else _random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._separate_ranks = trainer.world_size > 1
        if self._state is None and self._separate_ranks:
            _seed_for_rank(trainer.global_rank)
            self._separate_ranks = False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._state is not None:
            _set_random_state(self._state)
            if self._separate_ranks:
                _seed_for_rank(trainer.global_rank)
                self._separate_ranks = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning runs checkpoint callbacks after all others, so a checkpoint saved at the
        # end of this step stores the state recorded here.
        self._state = _random_state()


def _seed_for_rank(rank: int) -> None:
    """Reseed every generator from one draw of the shared state plus the process rank."""
    seed = int(torch.randint(0, 2**31, (1,)).item()) + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds the CUDA generators


def _random_state() -> dict[str, Any]:
    # Plain types and tensors only, so that checkpoints load with torch.load(weights_only=True).
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                  cached_gaussian],
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LastCheckpoint(Checkpoint):
    """Write last.ckpt, the checkpoint runs resume from, between training steps.

    It is saved after the step that ends an epoch, after each step that precedes a
    validation, every `every_n_train_steps` steps when set, and after the final step. When
    the next epoch starts it is saved again, so that it also contains the results of the
    previous epoch's validation (the best checkpoint so far, the run summary).

    It is never saved during validation or when training ends, because Lightning 2.6
    restores the epoch counter of such a checkpoint one ahead, and the resumed run trains
    one epoch short.

    NOTE: the last.ckpt of a run that ended at an epoch's end predates that epoch's
    validation, which a run extended from it does not repeat. An extra best-*.ckpt can then
    remain, and the best-checkpoint choice does not see that validation.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                "callbacks.last_checkpoint.every_n_train_steps must be >= 1 or null, "
                f"got {every_n_train_steps}"
            )
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.monitor = None
        self.last_model_path = ""

    @property
    def path(self) -> str:
        return str(Path(self.dirpath) / "last.ckpt")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.fast_dev_run and self._due(trainer):
            self._save(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the first epoch, the previous epoch and its validation are complete here.
        if not trainer.fast_dev_run and trainer.current_epoch > 0:
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        # Set before saving, so that the checkpoint records its own path.
        self.last_model_path = self.path
        trainer.save_checkpoint(self.path, weights_only=False)

    def _due(self, trainer: L.Trainer) -> bool:
        epoch_loop = trainer.fit_loop.epoch_loop
        step = trainer.global_step
        if epoch_loop.batch_progress.is_last_batch:
            return True
        if trainer.max_steps > 0 and step >= trainer.max_steps:
            return True
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            return True
        interval = trainer.val_check_batch
        if isinstance(interval, int) and interval > 0:
            # Lightning counts batches over the whole run when check_val_every_n_epoch is
            # None, and within the epoch otherwise.
            batches = (
                epoch_loop.total_batch_idx
                if trainer.check_val_every_n_epoch is None
                else epoch_loop.batch_idx
            )
            return (batches + 1) % interval == 0
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_model_path = state_dict.get("last_model_path", "")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, then rename it into place.

    A process killed while saving leaves the previous checkpoint intact: the rename is
    atomic on POSIX file systems, and the partial temporary file is removed on the next
    save. Remote paths (s3://, gs://...) fall back to Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}; remove them from the trainer's checkpoint settings"
            )
        if "://" in str(path):
            _atomic_save(checkpoint, str(path))
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
