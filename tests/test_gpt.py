"""Tests of the transformer network and the GPT LightningModule, on CPU with tiny models."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from datamodules.text import IGNORE_INDEX, TextDataModule
from lightning_modules.gpt import GPT, warmup_cosine_lr
from lightning_modules.nets.transformer import Transformer, TransformerConfig

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "warmup_steps": 2, "sample_length": 40}

WORDS = "the king doth wake to night and speak of crowns, my lord; thou art here".split()


def make_text(num_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def tiny_transformer(**overrides) -> Transformer:
    settings = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}
    settings.update(overrides)
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**settings)).eval()


def make_trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


# Transformer


def test_transformer_is_causal():
    net = tiny_transformer()
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % 11

    logits, _ = net(idx)
    changed_logits, _ = net(changed)

    assert torch.allclose(logits[:, :5], changed_logits[:, :5], atol=1e-6)
    assert not torch.allclose(logits[:, 5:], changed_logits[:, 5:], atol=1e-3)


def test_head_tied_to_token_embedding():
    net = tiny_transformer()

    assert net.head.weight is net.token_embedding.weight
    names = [name for name, _ in net.named_parameters()]
    assert "head.weight" not in names
    assert net.num_parameters() == sum(p.numel() for _, p in net.named_parameters())


def test_residual_projections_have_scaled_init():
    net = tiny_transformer(n_layer=4, n_embd=128, n_head=4)
    expected_std = 0.02 / math.sqrt(2 * 4)

    for block in net.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(expected_std, rel=0.05)
        assert block.mlp.proj.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert net.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_bias_option_adds_biases():
    without_bias = tiny_transformer(bias=False)
    with_bias = tiny_transformer(bias=True)

    assert without_bias.blocks[0].attn.qkv.bias is None
    assert without_bias.ln_f.bias is None
    assert with_bias.blocks[0].attn.qkv.bias is not None
    assert with_bias.ln_f.bias is not None


def test_loss_ignores_padded_targets():
    net = tiny_transformer()
    idx = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(3))
    padded = targets.clone()
    padded[:, 5:] = IGNORE_INDEX

    logits, loss = net(idx, padded)
    expected = F.cross_entropy(logits[0, :5], targets[0, :5])

    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_forward_rejects_long_sequence():
    net = tiny_transformer()
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        net(torch.zeros(1, 9, dtype=torch.int64))


def test_generate_crops_context_to_block_size():
    net = tiny_transformer()
    prompt = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(4))

    out = net.generate(prompt, max_new_tokens=10, top_k=3)

    assert out.shape == (2, 22)
    assert torch.equal(out[:, :12], prompt)
    assert ((out >= 0) & (out < 11)).all()


def test_generate_is_reproducible_with_generator():
    net = tiny_transformer()
    prompt = torch.zeros(1, 1, dtype=torch.int64)

    first = net.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    second = net.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    other = net.generate(prompt, 20, generator=torch.Generator().manual_seed(8))

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by n_head"):
        TransformerConfig(vocab_size=10, block_size=8, n_head=3, n_embd=16)


# Optimizer and learning-rate schedule


def test_adamw_decay_groups():
    datamodule = TextDataModule(source="embedded", block_size=16)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL, bias=True, lr_decay_steps=10)

    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups

    assert isinstance(optimizer, torch.optim.AdamW)
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.net.token_embedding.weight for p in decay["params"])
    assert any(p is model.net.blocks[0].attn.qkv.bias for p in no_decay["params"])
    assert any(p is model.net.ln_f.weight for p in no_decay["params"])
    num_grouped = len(decay["params"]) + len(no_decay["params"])
    assert num_grouped == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.99)


def test_lr_schedule_values():
    schedule = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "decay_steps": 2000}

    assert warmup_cosine_lr(0, **schedule) == pytest.approx(1e-3 / 101)
    assert warmup_cosine_lr(50, **schedule) == pytest.approx(1e-3 * 51 / 101)
    assert warmup_cosine_lr(100, **schedule) == pytest.approx(1e-3)
    assert warmup_cosine_lr(1050, **schedule) == pytest.approx((1e-3 + 1e-4) / 2)
    assert warmup_cosine_lr(2000, **schedule) == pytest.approx(1e-4)
    assert warmup_cosine_lr(5000, **schedule) == pytest.approx(1e-4)


def test_lr_scheduler_follows_schedule():
    datamodule = TextDataModule(source="embedded", block_size=16)
    model = GPT(
        **datamodule.model_inputs(), **{**TINY_MODEL, "warmup_steps": 10}, lr_decay_steps=50
    )
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"

    learning_rates = []
    for _ in range(60):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    assert learning_rates[0] == pytest.approx(1e-3 / 11)
    assert learning_rates[10] == pytest.approx(1e-3)
    assert learning_rates[50] == pytest.approx(1e-4)
    assert learning_rates[59] == pytest.approx(1e-4)
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]


def test_lr_decays_until_max_steps_by_default(tmp_path, text_file):
    datamodule = TextDataModule(source="file", path=str(text_file), block_size=16, batch_size=4)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL)  # lr_decay_steps is None
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=0)

    trainer.fit(model, datamodule)

    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 6
    # After the last of the 6 steps, the schedule has reached min_lr.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": 0.0}, "model.lr"),
        ({"min_lr": 2e-3}, "model.min_lr"),
        ({"warmup_steps": -1}, "model.warmup_steps"),
        ({"warmup_steps": 10, "lr_decay_steps": 5}, "model.lr_decay_steps"),
        ({"weight_decay": -0.1}, "model.weight_decay"),
        ({"betas": [0.9, 1.0]}, "model.betas"),
        ({"sample_prompt": ""}, "model.sample_prompt"),
        ({"sample_prompt": "\u00e9"}, "model.sample_prompt"),
        ({"sample_temperature": 0.0}, "model.sample_temperature"),
        ({"sample_top_k": 0}, "model.sample_top_k"),
    ],
)
def test_invalid_settings_rejected(settings, message):
    datamodule = TextDataModule(source="embedded", block_size=16)
    with pytest.raises(ValueError, match=message):
        GPT(**datamodule.model_inputs(), **{**TINY_MODEL, **settings})


# Validation metrics


def test_validation_metrics_weight_every_token(tmp_path, text_file):
    # Batches of 3 chunks of 16 tokens leave a short last chunk and a short last batch, so
    # a plain mean over batches would differ from the mean over tokens.
    datamodule = TextDataModule(
        source="file", path=str(text_file), block_size=16, batch_size=4, val_batch_size=3
    )
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL)
    trainer = make_trainer(tmp_path, max_steps=1)
    num_chunks = math.ceil((len(datamodule.val_tokens) - 1) / 16)
    assert num_chunks % 3 != 0
    assert (len(datamodule.val_tokens) - 1) % 16 != 0

    metrics = trainer.validate(model, datamodule, verbose=False)[0]

    # Independent computation: the whole split as consecutive windows, summed cross-entropy.
    model.eval()
    val_tokens = datamodule.val_tokens
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val_tokens) - 1, 16):
            x = val_tokens[start : start + 16][None]
            y = val_tokens[start + 1 : start + 17][None]
            x = x[:, : y.shape[1]]
            logits, _ = model(x)
            loss_sum += F.cross_entropy(logits[0], y[0], reduction="sum").item()
            count += y.numel()
    expected_loss = loss_sum / count

    assert count == len(val_tokens) - 1
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected_loss), rel=1e-4)
    assert metrics["val/bpt"] == pytest.approx(expected_loss / math.log(2), rel=1e-5)


# Training end to end


@pytest.mark.parametrize(
    ("source", "tokenizer"), [("embedded", "char"), ("file", "char"), ("file", "byte")]
)
def test_trains_and_writes_samples(tmp_path, text_file, source, tokenizer):
    path = str(text_file) if source == "file" else None
    datamodule = TextDataModule(
        source=source, path=path, tokenizer=tokenizer, block_size=32, batch_size=16,
        val_batch_size=64,
    )  # fmt: skip
    model = GPT(**datamodule.model_inputs(), **{**TINY_MODEL, "lr": 3e-3})
    logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = make_trainer(
        tmp_path, max_steps=40, val_check_interval=20, check_val_every_n_epoch=None,
        logger=logger, log_every_n_steps=5, limit_val_batches=8,
    )  # fmt: skip

    trainer.fit(model, datamodule)

    # An untrained model predicts about uniformly: loss ln(vocab_size).
    uniform_loss = math.log(datamodule.tokenizer.vocab_size)
    assert trainer.callback_metrics["val/loss"].item() < uniform_loss - 0.5
    assert trainer.callback_metrics["train/loss"].item() < uniform_loss - 0.5

    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == ["text_epoch000_step000020.txt", "text_epoch000_step000040.txt"]
    sample = (tmp_path / "samples" / samples[-1]).read_text(encoding="utf-8")
    assert sample.startswith("\n")
    if tokenizer == "char":
        assert len(sample) == 1 + 40

    metrics_csv = (tmp_path / "csv" / "metrics.csv").read_text()
    header = metrics_csv.splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/ppl", "val/bpt"} <= set(header)


def test_checkpoint_reload_gives_identical_model(tmp_path, text_file):
    datamodule = TextDataModule(source="file", path=str(text_file), block_size=16, batch_size=8)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL, dropout=0.1)
    trainer = make_trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(model, datamodule)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)

    # torch.load's default weights_only=True loads it, because the checkpoint contains only
    # plain Python values.
    reloaded = GPT.load_from_checkpoint(checkpoint, map_location="cpu")

    model.eval()
    reloaded.eval()
    x = datamodule.val_tokens[:16][None]
    with torch.no_grad():
        assert torch.equal(model(x)[0], reloaded(x)[0])
    assert reloaded.hparams.tokenizer == datamodule.tokenizer.to_dict()
    assert reloaded.hparams.dropout == 0.1
    sample = reloaded.sample_text("The king", 30, seed=3)
    assert sample == model.sample_text("The king", 30, seed=3)
    assert sample.startswith("The king")
    assert len(sample) == len("The king") + 30
    assert set(sample) <= set(datamodule.tokenizer.chars)


def test_sample_text_restores_training_mode(text_file):
    datamodule = TextDataModule(source="file", path=str(text_file), block_size=16)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL, dropout=0.2)
    model.train()

    first = model.sample_text("the", 20, seed=1)

    assert model.training
    assert model.sample_text("the", 20, seed=1) == first


def test_monitor_is_validation_loss(text_file):
    datamodule = TextDataModule(source="file", path=str(text_file), block_size=16)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL)

    assert model.monitor == "val/loss"
    assert model.monitor_mode == "min"
    assert GPT.modality == TextDataModule.modality == "text"


def test_samples_logged_to_wandb_offline(tmp_path, text_file, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    datamodule = TextDataModule(source="file", path=str(text_file), block_size=16, batch_size=8)
    model = GPT(**datamodule.model_inputs(), **TINY_MODEL)
    logger = WandbLogger(project="genlab-tests", save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(
        tmp_path, max_steps=2, logger=logger, val_check_interval=2, limit_val_batches=2
    )

    try:
        trainer.fit(model, datamodule)
    finally:
        wandb.finish()

    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/samples/*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["epoch", "step", "text"]
    assert table["data"][0][:2] == [0, 2]
    assert table["data"][0][2].startswith("\n")
