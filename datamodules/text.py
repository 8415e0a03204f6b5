"""Text corpora for next-token prediction, split into a training and a validation part.

The corpus is tokenized once and split contiguously: the first (1 - val_fraction) of the
tokens are for training, the rest for validation. Batches are `(x, y)` int64 tensors of
shape (B, T), where y[:, t] is the token that follows x[:, t].

- Training draws windows of block_size + 1 tokens that may start at any position. The
  dataset contains every start position once, and a seeded sampler shuffles them (and
  splits them between processes under DDP), so batches are random windows.
- Validation reads the validation tokens once, in consecutive non-overlapping chunks of
  block_size targets. The last chunk can be shorter. The collate function pads it and
  marks the padded targets -100, the index that the loss and perplexity ignore. Each
  validation token except the first is therefore a target exactly once.

There is no test split: models are evaluated on the validation split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import ResumableTrainOrder
from datamodules.tokenizers import TOKENIZER_CLASSES, Tokenizer, build_tokenizer
from genlab.preemption import init_dataloader_worker

log = logging.getLogger(__name__)

SOURCES = ("embedded", "shakespeare", "file")

# A 200,376-character excerpt of tiny Shakespeare that ships with the package; see
# assets/README.md for its source and checksum.
EMBEDDED_CORPUS = "shakespeare_excerpt.txt"

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_SUBPATH = Path("tinyshakespeare") / "input.txt"
# Seconds to wait for the server to connect or send data before the download fails.
DOWNLOAD_TIMEOUT_S = 30.0

# Target value of padded positions; torch's cross-entropy and torchmetrics' Perplexity
# skip targets equal to their ignore_index, which is -100 throughout genlab.
IGNORE_INDEX = -100


class TrainWindows(Dataset):
    """Every window of block_size + 1 consecutive tokens. Item i starts at token i."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class ValidationChunks(Dataset):
    """Consecutive non-overlapping chunks whose targets cover tokens[1:] exactly once.

    Chunk i contains the inputs tokens[i*T : (i+1)*T] and the targets shifted by one, where
    T = block_size. The last chunk is shorter when len(tokens) - 1 is not a multiple of T.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.num_targets = len(tokens) - 1

    def __len__(self) -> int:
        return math.ceil(self.num_targets / self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        end = min(start + self.block_size, self.num_targets)
        return self.tokens[start:end], self.tokens[start + 1 : end + 1]


def pad_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (x, y) pairs into (B, T) tensors, padding shorter sequences at the end.

    Padded inputs are 0, a valid id whose outputs are never scored, and padded targets
    are IGNORE_INDEX. The model is causal, so padding after a sequence does not change
    its logits.
    """
    inputs, targets = zip(*batch, strict=True)
    x = pad_sequence(inputs, batch_first=True, padding_value=0)
    y = pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
    return x, y


def md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_shakespeare(target: Path, url: str) -> None:
    """Download tiny Shakespeare to `target` and check its md5.

    The file is written under a temporary name and renamed when complete, so an
    interrupted download never leaves a partial `target` behind.
    """
    log.info("Downloading tiny Shakespeare from %s to %s", url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            content = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise FileNotFoundError(
            f"tiny Shakespeare is missing at {target} and the download from {url} failed: "
            f"{error}. Download input.txt yourself and put it in the folder {target.parent}, "
            "or set data.path to a copy of the file."
        ) from error

    md5 = hashlib.md5(content).hexdigest()
    if md5 != SHAKESPEARE_MD5:
        raise ValueError(
            f"the file downloaded from {url} has md5 {md5}, expected {SHAKESPEARE_MD5}; "
            f"nothing was written to {target}. Download input.txt yourself and put it in "
            f"the folder {target.parent}."
        )

    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as file:
        file.write(content)
    os.replace(file.name, target)


def read_text_file(path: Path, setting: str) -> str:
    """Read a UTF-8 text file; errors name the config `setting` that gave the path."""
    if not path.is_file():
        raise FileNotFoundError(
            f"text file not found: {path} (from {setting}). Set {setting} to an existing "
            "UTF-8 text file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} (from {setting}) is not valid UTF-8 text: {error}. Convert the file "
            "to UTF-8 first."
        ) from error


class TextDataModule(ResumableTrainOrder, L.LightningDataModule):
    """A text corpus as (x, y) batches of token ids for next-token prediction.

    Args:
        source: "embedded" (the Shakespeare excerpt that ships with genlab),
            "shakespeare" (tiny Shakespeare, about 1.1 million characters) or "file"
            (any UTF-8 text file given by `path`).
        tokenizer: "char" (one id per distinct character of the whole corpus) or "byte"
            (UTF-8 bytes, 256 ids).
        block_size: context length in tokens of the training windows and validation
            chunks.
        batch_size: training windows per batch.
        val_batch_size: validation chunks per batch; None uses batch_size.
        val_fraction: fraction of the tokens, taken from the end of the corpus, that
            forms the validation split.
        num_workers: DataLoader worker processes; 0 loads batches in the main process.
        path: the text file. Required for "file". For "shakespeare", None means
            `<data_dir>/tinyshakespeare/input.txt`.
        data_dir: folder of downloaded data sets; read by "shakespeare" only.
        download: for "shakespeare", download the file when it is missing.
    """

    modality = "text"

    def __init__(
        self,
        source: str = "embedded",
        tokenizer: str = "char",
        block_size: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        path: str | None = None,
        data_dir: str | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        self._check_arguments(
            source, tokenizer, block_size, batch_size, val_batch_size, val_fraction,
            num_workers, path, data_dir, download,
        )  # fmt: skip
        self.source = source
        self.tokenizer_kind = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size if val_batch_size is not None else batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.path = Path(path) if path is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.download = download

        self.tokenizer: Tokenizer | None = None
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None

    @staticmethod
    def _check_arguments(
        source: str,
        tokenizer: str,
        block_size: int,
        batch_size: int,
        val_batch_size: int | None,
        val_fraction: float,
        num_workers: int,
        path: str | None,
        data_dir: str | None,
        download: bool,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)}, got {source!r}")
        if tokenizer not in TOKENIZER_CLASSES:
            raise ValueError(
                f"data.tokenizer must be one of {sorted(TOKENIZER_CLASSES)}, got {tokenizer!r}"
            )
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1 or null, got {val_batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")

        if source == "file" and path is None:
            raise ValueError("data.path is required for data.source 'file'; set it to a text file")
        if source == "embedded" and path is not None:
            raise ValueError(
                f"data.path ({path}) is not read by data.source 'embedded'; remove it, "
                "or use data.source 'file' to train on that file"
            )
        if source != "shakespeare" and data_dir is not None:
            raise ValueError(
                f"data.data_dir is read only by data.source 'shakespeare', got source {source!r}"
            )
        if source != "shakespeare" and download:
            raise ValueError(
                f"data.download applies only to data.source 'shakespeare', got source {source!r}"
            )
        if source == "shakespeare" and path is None and data_dir is None:
            raise ValueError(
                "data.source 'shakespeare' needs data.path (the input.txt file) or "
                "data.data_dir (the folder that contains tinyshakespeare/input.txt)"
            )

    def shakespeare_file(self) -> Path:
        """Location of tiny Shakespeare: data.path, else <data_dir>/tinyshakespeare/input.txt."""
        if self.path is not None:
            return self.path
        assert self.data_dir is not None  # checked in the constructor
        return self.data_dir / SHAKESPEARE_SUBPATH

    def prepare_data(self) -> None:
        if self.source != "shakespeare":
            return
        target = self.shakespeare_file()
        if target.is_file():
            return
        if not self.download:
            raise FileNotFoundError(
                f"tiny Shakespeare not found at {target}. Put input.txt in the folder "
                f"{target.parent} (it is {SHAKESPEARE_URL}), set data.path to a copy of "
                "it, or set data.download=true."
            )
        download_shakespeare(target, SHAKESPEARE_URL)

    def read_corpus(self) -> str:
        """Return the whole text of the selected source."""
        if self.source == "embedded":
            asset = resources.files(__package__).joinpath("assets", EMBEDDED_CORPUS)
            return asset.read_text(encoding="utf-8")
        if self.source == "shakespeare":
            setting = "data.path" if self.path is not None else "data.data_dir"
            return read_text_file(self.shakespeare_file(), setting)
        assert self.path is not None  # checked in the constructor
        return read_text_file(self.path, "data.path")

    def available_splits(self) -> tuple[str, ...]:
        """Return the splits a model can be evaluated on: the validation split only."""
        return ("val",)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return

        text = self.read_corpus()
        tokenizer = build_tokenizer(self.tokenizer_kind, text)
        tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        num_train = int(len(tokens) * (1.0 - self.val_fraction))
        train_tokens, val_tokens = tokens[:num_train], tokens[num_train:]

        if len(train_tokens) < self.block_size + 1:
            raise ValueError(
                f"the training split has {len(train_tokens)} tokens, fewer than "
                f"data.block_size + 1 = {self.block_size + 1}, the length of one training "
                "window. Use a longer text or a smaller data.block_size."
            )
        if len(val_tokens) < 2:
            raise ValueError(
                f"the validation split has {len(val_tokens)} token(s); it needs at least 2 "
                "to hold one target. Use a longer text or a larger data.val_fraction."
            )

        self.tokenizer = tokenizer
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        if rank_zero_only.rank == 0:
            log.info(
                "Text source %r: %d characters, %d %s tokens (vocabulary %d), "
                "%d for training and %d for validation",
                self.source, len(text), len(tokens), self.tokenizer_kind,
                tokenizer.vocab_size, len(train_tokens), len(val_tokens),
            )  # fmt: skip

    def model_inputs(self) -> dict[str, Any]:
        """Return the model's constructor arguments that depend on the data."""
        self.prepare_data()
        self.setup()
        assert self.tokenizer is not None
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "block_size": self.block_size,
            "tokenizer": self.tokenizer.to_dict(),
        }

    def train_dataloader(self) -> DataLoader:
        assert self.train_tokens is not None, "call setup() first"
        return self.resumable_train_loader(
            TrainWindows(self.train_tokens, self.block_size),
            batch_size=self.batch_size,
            collate_fn=pad_collate,
            num_workers=self.num_workers,
            worker_init_fn=init_dataloader_worker,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_tokens is not None, "call setup() first"
        dataset = ValidationChunks(self.val_tokens, self.block_size)
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=self._validation_sampler(dataset),
            collate_fn=pad_collate,
            num_workers=self.num_workers,
            worker_init_fn=init_dataloader_worker,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        raise ValueError(
            f"text data (data.source={self.source!r}) has no test split; evaluate on the "
            "validation split, the last data.val_fraction of the tokens."
        )

    def _validation_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Split the chunks across processes without repeating any, or None for one process.

        Lightning's default DistributedSampler repeats chunks to give every process the
        same number, which would count those tokens twice in the validation loss. Lightning
        keeps a sampler that is already a DistributedSampler, as this one is.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        # NOTE: processes may then run different numbers of validation batches. That is
        # safe because the network has no buffers for DDP to synchronise in its forward
        # pass, and metrics are synchronised only at the end of the epoch.
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
