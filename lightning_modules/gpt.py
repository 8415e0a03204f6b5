"""GPT language model: training, validation metrics and text samples around the Transformer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from datamodules.tokenizers import tokenizer_from_dict
from genlab.checkpoints import RecordsModelClass
from genlab.samples import samples_dir
from lightning_modules.nets.transformer import Transformer, TransformerConfig

IGNORE_INDEX = -100


def warmup_cosine_lr(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> float:
    """Learning rate of optimizer step `step` (counted from 0).

    It rises linearly over the first warmup_steps steps, reaching lr at step warmup_steps
    (step 0 gets lr / (warmup_steps + 1), so no step has a zero rate). It then follows a
    half cosine from lr down to min_lr at step decay_steps and stays at min_lr after that.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / (decay_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class GPT(RecordsModelClass, L.LightningModule):
    """Decoder-only transformer trained by next-token prediction.

    vocab_size, block_size and tokenizer come from the datamodule's `model_inputs()`; the
    other arguments come from conf/model/gpt.yaml, which documents each of them. The
    tokenizer description is saved with the hyperparameters, so a model loaded with
    `GPT.load_from_checkpoint` can decode what it generates.

    Validation logs val/loss (mean cross-entropy per target token, in nats), val/bpt (the
    same in bits) and val/ppl. `Trainer.test` logs the same metrics under the split name
    given to `configure_test` ("test" by default).
    """

    modality = "text"

    @classmethod
    def metric_keys(cls, node: Mapping[str, Any]) -> list[str]:
        """Return the validation metric keys this model logs."""
        return ["val/loss", "val/bpt", "val/ppl"]

    @classmethod
    def config_problems(cls, node: Mapping[str, Any]) -> list[str]:
        """Return the problems between arguments that the config validator reports.

        Each problem starts with the key it concerns, without the "model." prefix.
        """
        problems = []
        n_embd, n_head = node.get("n_embd"), node.get("n_head")
        if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and n_embd % n_head:
            problems.append(f"n_embd={n_embd} is not divisible by n_head={n_head}, but each head "
                            f"gets n_embd // n_head channels. Pick n_embd as a multiple of n_head.")
        lr, min_lr = node.get("lr"), node.get("min_lr")
        if isinstance(lr, (int, float)) and isinstance(min_lr, (int, float)) and 0 < lr < min_lr:
            problems.append(f"min_lr={min_lr} is larger than lr={lr}, so the cosine decay would "
                            f"raise the learning rate. Set min_lr to at most {lr}.")
        warmup, decay = node.get("warmup_steps"), node.get("lr_decay_steps")
        if isinstance(warmup, int) and isinstance(decay, int) and decay < warmup:
            problems.append(
                f"lr_decay_steps={decay} is smaller than warmup_steps={warmup}. Set "
                f"lr_decay_steps to at least {warmup}, or to null for trainer.max_steps."
            )
        return problems

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        tokenizer: dict[str, Any],
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.99),
        sample_prompt: str = "\n",
        sample_length: int = 300,
        sample_temperature: float = 1.0,
        sample_top_k: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        # Hydra passes lists and dicts as OmegaConf containers. Plain Python values keep the
        # checkpoint loadable by torch.load(weights_only=True), torch's default since 2.6.
        tokenizer = {str(key): value for key, value in tokenizer.items()}
        betas = tuple(float(beta) for beta in betas)
        self.save_hyperparameters(logger=False)
        self._check_optimizer_arguments()

        self.tokenizer = tokenizer_from_dict(tokenizer)
        if self.tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"vocab_size ({vocab_size}) differs from the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}); pass both from the same datamodule"
            )
        self._check_sample_arguments()

        self.net = Transformer(
            TransformerConfig(
                vocab_size=vocab_size,
                block_size=block_size,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                dropout=dropout,
                bias=bias,
            )
        )

        # val/loss is the mean cross-entropy per target token over the whole validation
        # split: each batch's mean enters weighted by its number of targets. Test reuses
        # these metrics, which never run at the same time as validation.
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        # Name of the split `Trainer.test` reads, the first part of the test metric keys.
        self.test_split = "test"

    def _check_optimizer_arguments(self) -> None:
        hp = self.hparams
        if hp.lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {hp.lr}")
        if not 0 <= hp.min_lr <= hp.lr:
            raise ValueError(f"model.min_lr must be in [0, model.lr = {hp.lr}], got {hp.min_lr}")
        if hp.warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {hp.warmup_steps}")
        if hp.lr_decay_steps is not None and hp.lr_decay_steps < hp.warmup_steps:
            raise ValueError(
                f"model.lr_decay_steps ({hp.lr_decay_steps}) must be >= model.warmup_steps "
                f"({hp.warmup_steps}), or null to decay until trainer.max_steps"
            )
        if hp.weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {hp.weight_decay}")
        if len(hp.betas) != 2 or not all(0 <= beta < 1 for beta in hp.betas):
            raise ValueError(f"model.betas must be two numbers in [0, 1), got {list(hp.betas)}")

    def _check_sample_arguments(self) -> None:
        hp = self.hparams
        if not hp.sample_prompt:
            raise ValueError("model.sample_prompt must not be empty; the default is a newline")
        try:
            self.tokenizer.encode(hp.sample_prompt)
        except ValueError as error:
            raise ValueError(f"model.sample_prompt {hp.sample_prompt!r}: {error}") from error
        if hp.sample_length < 0:
            raise ValueError(f"model.sample_length must be >= 0, got {hp.sample_length}")
        if hp.sample_temperature <= 0:
            raise ValueError(f"model.sample_temperature must be > 0, got {hp.sample_temperature}")
        if hp.sample_top_k is not None and hp.sample_top_k < 1:
            raise ValueError(f"model.sample_top_k must be >= 1 or null, got {hp.sample_top_k}")

    @property
    def monitor(self) -> str:
        return "val/loss"

    @property
    def monitor_mode(self) -> str:
        return "min"

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net(idx, targets)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        _, loss = self.net(x, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._update_loss_metrics(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_loss_metrics("val")
        if not self.trainer.sanity_checking:
            self._save_text_sample()

    def configure_test(self, split: str = "test") -> None:
        """Choose the split name that `Trainer.test` logs its metrics under, e.g. "val"."""
        self.test_split = split

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._update_loss_metrics(batch)

    def on_test_epoch_end(self) -> None:
        self._log_loss_metrics(self.test_split)

    def _update_loss_metrics(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits, _ = self.net(x)
        logits = logits.float()  # (B, T, vocab_size)

        num_targets = (y != IGNORE_INDEX).sum()
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        self.val_loss.update(loss_sum / num_targets, weight=num_targets)
        self.val_ppl.update(logits, y)

    def _log_loss_metrics(self, split: str) -> None:
        """Log loss, bits per token and perplexity under `split`/, then reset the metrics."""
        # compute() already sums over all processes, so every rank logs the same values,
        # and sync_dist only averages identical numbers.
        loss = self.val_loss.compute()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/bpt", loss / math.log(2), sync_dist=True)
        self.log(f"{split}/ppl", self.val_ppl.compute(), sync_dist=True)
        self.val_loss.reset()
        self.val_ppl.reset()

    @rank_zero_only
    def _save_text_sample(self) -> None:
        """Write a sample from the configured prompt and seed to the run and the W&B logger."""
        hp = self.hparams
        text = self.sample_text(
            hp.sample_prompt,
            hp.sample_length,
            temperature=hp.sample_temperature,
            top_k=hp.sample_top_k,
            seed=hp.sample_seed,
        )
        epoch, step = self.current_epoch, self.global_step

        path = samples_dir(self.trainer) / f"text_epoch{epoch:03d}_step{step:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(
                    key="samples/text",
                    columns=["epoch", "step", "text"],
                    data=[[epoch, step, text]],
                    step=step,
                )

    def sample_text(
        self,
        prompt: str,
        length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """Generate `length` tokens after `prompt` and return the decoded text, prompt included.

        The same seed, prompt and weights give the same text. Dropout is off during sampling.
        """
        prompt_ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            ids = self.net.generate(
                prompt_ids, length, temperature=temperature, top_k=top_k, generator=generator
            )
        finally:
            self.train(was_training)
        return self.tokenizer.decode(ids[0].tolist())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Weight decay applies to the weights of linear layers and embeddings only; biases
        # and LayerNorm gains are left alone. The choice goes by module type, not by
        # p.dim(): FSDP hands the optimizer flattened 1-D views of every parameter.
        decay_ids = {
            id(module.weight)
            for module in self.modules()
            if isinstance(module, (nn.Linear, nn.Embedding))
        }
        parameters = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in parameters if id(p) in decay_ids]
        no_decay = [p for p in parameters if id(p) not in decay_ids]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=hp.betas,
        )

        decay_steps = self._lr_decay_steps()

        def lr_factor(step: int) -> float:
            schedule = warmup_cosine_lr(
                step,
                lr=hp.lr,
                min_lr=hp.min_lr,
                warmup_steps=hp.warmup_steps,
                decay_steps=decay_steps,
            )
            return schedule / hp.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _lr_decay_steps(self) -> int:
        """model.lr_decay_steps, or the number of optimizer steps of the run when it is null."""
        hp = self.hparams
        if hp.lr_decay_steps is not None:
            return hp.lr_decay_steps
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "model.lr_decay_steps is null, so the learning rate decays until the end of "
                "training, but the run has no finite length; set trainer.max_steps or "
                "model.lr_decay_steps"
            )
        # A run shorter than the warm-up (such as a smoke test) ends during the warm-up.
        return max(int(total_steps), hp.warmup_steps)
