"""Distributed data parallel with 2 CPU processes and the gloo backend.

train.py runs and multiruns are started as users start them (a subprocess), with
trainer=ddp_cpu. The metric comparisons and the GAN run in this process with
Trainer(strategy="ddp_spawn"), because Lightning's "ddp" launcher would start this test
process's command line (pytest) again for rank 1; both strategies use the same DDPStrategy.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import conftest
import lightning as L
import pytest
import torch
import yaml
from conftest import compose_config, job_config
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset

from datamodules.images import ImageDataModule
from datamodules.text import TextDataModule
from genlab.config_check import check_config
from genlab.ddp import inherited_hydra_overrides, quote_override_value, validation_sampler
from genlab.resume import RandomStateCheckpoint
from lightning_modules.gan import GAN
from lightning_modules.gpt import GPT
from lightning_modules.nets.transformer import MLP, Block, TransformerConfig
from lightning_modules.vae import VAE

# validate_best=true checks that validation after fit works on every rank.
DDP_SMOKE = ["debug=smoke", "trainer=ddp_cpu", "validate_best=true"]
# Seconds a train.py run may take; a run takes about 15 s on 2 CPU cores.
RUN_TIMEOUT_S = 300
CHILD_LOG = "train_ddp_process_1.log"
BEST_CHECKPOINT_LINE = re.compile(r"Validating the best checkpoint: (\S+)")


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` from `cwd`, failing after RUN_TIMEOUT_S.

    A rank that waits for a partner that never starts hangs, so the limit is shorter than
    conftest's default; on a timeout conftest kills the rank-1 processes too.
    """
    return conftest.run_train(args, cwd, timeout=RUN_TIMEOUT_S)


def wandb_run_files(run_dir: Path) -> list[Path]:
    return list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


# ---------------------------------------------------------------------- a single run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One smoke run of the default VAE with two processes."""
    cwd = tmp_path_factory.mktemp("ddp_run")
    result = run_train([*DDP_SMOKE, "seed=0"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = list((cwd / "logs" / "vae_digits" / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return cwd, result, runs[0]


def test_ddp_run_creates_one_run_directory(ddp_run):
    cwd, _, run_dir = ddp_run
    assert [path.name for path in cwd.iterdir()] == ["logs"]
    assert [path.name for path in (cwd / "logs").iterdir()] == ["vae_digits"]
    assert [path.name for path in (cwd / "logs" / "vae_digits").iterdir()] == ["runs"]
    assert (run_dir / "config.yaml").is_file()


def test_ddp_run_writes_one_wandb_run(ddp_run):
    _, result, run_dir = ddp_run
    assert len(wandb_run_files(run_dir)) == 1
    assert (result.stdout + result.stderr).count("W&B runs offline") == 1


def test_ddp_run_rank_one_logs_into_run_directory(ddp_run):
    _, _, run_dir = ddp_run
    for log_name in ("train.log", CHILD_LOG):
        text = (run_dir / log_name).read_text()
        assert text.count(f"Run directory: {run_dir}") == 1, log_name


def test_ddp_run_info_is_written_by_rank_zero(ddp_run):
    _, _, run_dir = ddp_run
    run_info = json.loads((run_dir / "run_info.json").read_text())
    # Rank 1's command line carries the overrides that genlab.ddp adds for it.
    assert "hydra.output_subdir=null" not in run_info["command"]
    assert run_info["command"][1:] == [*DDP_SMOKE, "seed=0"]


def test_ddp_run_ranks_validate_same_best_checkpoint(ddp_run):
    _, _, run_dir = ddp_run
    paths = []
    for log_name in ("train.log", CHILD_LOG):
        found = BEST_CHECKPOINT_LINE.findall((run_dir / log_name).read_text())
        assert len(found) == 1, f"{log_name} has no single 'Validating the best checkpoint' line"
        paths.append(found[0])
    assert paths[0] == paths[1]
    assert Path(paths[0]).parent == run_dir / "checkpoints"


def test_ddp_run_checkpoints_load(ddp_run):
    _, _, run_dir = ddp_run
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert {path.name for path in checkpoints} >= {"last.ckpt"}
    assert any(path.name.startswith("best-") for path in checkpoints)
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["global_step"] == 4
        model = VAE.load_from_checkpoint(path, map_location="cpu")
        assert model.hparams.image_size == 16


# ---------------------------------------------------------------------- a multirun


@pytest.fixture(scope="module")
def ddp_multirun(tmp_path_factory):
    """A sweep of two DDP jobs (seed=1,2) into the default, timestamped sweep directory.

    A rank-1 process that re-ran the whole sweep would create a second sweep directory.
    """
    cwd = tmp_path_factory.mktemp("ddp_multirun")
    result = run_train(["-m", *DDP_SMOKE, "seed=1,2"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result


def sweep_dirs(cwd: Path) -> list[Path]:
    return list((cwd / "logs" / "vae_digits" / "multiruns").iterdir())


def test_ddp_multirun_creates_only_job_directories(ddp_multirun):
    cwd, result = ddp_multirun
    assert [path.name for path in cwd.iterdir()] == ["logs"]
    assert [path.name for path in (cwd / "logs").iterdir()] == ["vae_digits"]
    assert [path.name for path in (cwd / "logs" / "vae_digits").iterdir()] == ["multiruns"]
    sweeps = sweep_dirs(cwd)
    assert len(sweeps) == 1, f"expected one sweep directory, found {sweeps}"
    expected = ["0", "1", "multirun.yaml", "sweep_summary.json"]
    assert sorted(path.name for path in sweeps[0].iterdir()) == expected
    assert (result.stdout + result.stderr).count("Launching 2 jobs") == 1


@pytest.mark.parametrize(("job", "seed"), [(0, 1), (1, 2)])
def test_ddp_multirun_job_runs_on_both_ranks(ddp_multirun, job, seed):
    cwd, _ = ddp_multirun
    job_dir = sweep_dirs(cwd)[0] / str(job)
    assert yaml.safe_load((job_dir / "config.yaml").read_text())["seed"] == seed
    assert len(wandb_run_files(job_dir)) == 1
    assert len(list((job_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    for log_name in ("train.log", CHILD_LOG):
        text = (job_dir / log_name).read_text()
        assert text.count(f"Run directory: {job_dir}") == 1, log_name
        assert f"with seed={seed}" in text, log_name


# ---------------------------------------------------------------------- metrics


class CloseProcessGroup(Callback):
    """Close the gloo process group on every rank together, at the end of the spawned work.

    Left to exit handlers, the ranks close it one after the other. A rank then sometimes
    aborts in gloo's teardown ("terminate called without an active exception", about 1
    run in 10 on 2 busy cores), after its results are complete.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def validation_metrics(
    model: L.LightningModule, datamodule: L.LightningDataModule, devices: int, root: Path
) -> dict[str, float]:
    """Validate on `devices` CPU processes and return the logged metrics."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CloseProcessGroup()],
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


@pytest.mark.filterwarnings("ignore:FID real statistics use")
def test_fid_under_ddp_equals_single_process(tmp_path):
    # 400 generated images are four batches, two per rank. All 359 validation images are
    # used, and their number is odd: a sampler that repeats one to even out the ranks
    # shifts FID by about 1.5e-4 relative, above the tolerance. Summation order does not.
    fid = {"extractor": "randconv", "num_samples": 400, "every_n_epochs": 1}
    results = {}
    for devices in (1, 2):
        # A fresh model each time: the FID metric keeps its real statistics once computed.
        torch.manual_seed(0)
        model = VAE(image_size=8, channels=1, latent_dim=4, width=8, fid=fid)
        datamodule = ImageDataModule(
            source="digits", image_size=8, channels=1, batch_size=64, val_fraction=0.2
        )
        results[devices] = validation_metrics(model, datamodule, devices, tmp_path / str(devices))

    key = "val/fid_randconv_400"
    assert results[1][key] > 0
    assert results[2][key] == pytest.approx(results[1][key], rel=1e-5)


def test_perplexity_under_ddp_equals_single_process(tmp_path):
    results = {}
    for devices in (1, 2):
        torch.manual_seed(0)
        datamodule = TextDataModule(block_size=16, batch_size=8, val_batch_size=48)
        model = GPT(**datamodule.model_inputs(), n_layer=1, n_head=2, n_embd=16)
        results[devices] = validation_metrics(model, datamodule, devices, tmp_path / str(devices))

    assert results[1]["val/ppl"] > 1
    assert results[2]["val/ppl"] == pytest.approx(results[1]["val/ppl"], rel=1e-4)
    assert results[2]["val/loss"] == pytest.approx(results[1]["val/loss"], rel=1e-4)


# ---------------------------------------------------------------------- GAN training


class SaveParameters(Callback):
    """Save the parameters of each rank when training starts and when it ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module, f"start_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module, f"end_rank{trainer.global_rank}.pt")

    def _save(self, pl_module: L.LightningModule, name: str) -> None:
        parameters = {key: value.detach().clone() for key, value in pl_module.named_parameters()}
        torch.save({"step": pl_module.global_step, "parameters": parameters}, self.folder / name)


def fit_gan_on_two_processes(tmp_path: Path, max_steps: int, callbacks: list[Callback]) -> None:
    """Train a tiny GAN on the digits with DDP over 2 spawned CPU processes."""
    model = GAN(image_size=8, channels=1, latent_dim=8, generator_width=8, discriminator_width=8)
    datamodule = ImageDataModule(source="digits", image_size=8, channels=1, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        # Each of the GAN's two steps leaves one network without gradients.
        strategy="ddp_spawn_find_unused_parameters_true",
        max_steps=max_steps,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, CloseProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)


def test_gan_ranks_agree_after_ddp_steps(tmp_path):
    torch.manual_seed(0)
    # Three batches: a discriminator and a generator step each.
    fit_gan_on_two_processes(tmp_path, max_steps=6, callbacks=[SaveParameters(tmp_path)])

    start = torch.load(tmp_path / "start_rank0.pt")["parameters"]
    end = [torch.load(tmp_path / f"end_rank{rank}.pt") for rank in (0, 1)]
    assert [saved["step"] for saved in end] == [6, 6]
    rank0, rank1 = end[0]["parameters"], end[1]["parameters"]
    for network in ("generator.", "discriminator."):
        names = [name for name in rank0 if name.startswith(network)]
        assert names, f"no {network} parameters"
        assert any(not torch.equal(rank0[name], start[name]) for name in names), network
        for name in names:
            assert torch.allclose(rank0[name], rank1[name], rtol=0, atol=1e-6), name


class SaveNoise(Callback):
    """Save, per rank, random numbers drawn at the start of each training step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.draws: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.draws.append(torch.rand(4))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(torch.stack(self.draws), self.folder / f"noise_rank{trainer.global_rank}.pt")


def test_ranks_draw_different_noise(tmp_path):
    L.seed_everything(0)
    # SaveNoise draws after RandomStateCheckpoint has set the step's state.
    callbacks = [RandomStateCheckpoint(), SaveNoise(tmp_path)]
    fit_gan_on_two_processes(tmp_path, max_steps=4, callbacks=callbacks)

    rank0, rank1 = (torch.load(tmp_path / f"noise_rank{rank}.pt") for rank in (0, 1))
    assert rank0.shape == rank1.shape == (2, 4)
    assert not torch.equal(rank0, rank1), "both ranks drew the same random numbers"


# ---------------------------------------------------------------------- presets and helpers


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu", "fsdp"])
def test_distributed_trainer_preset_validates(tmp_path, trainer):
    cfg = compose_config(["experiment=embedded_gpt", f"trainer={trainer}"], tmp_path)
    check_config(job_config(cfg), dict(cfg.hydra.runtime.choices))


def test_fsdp_preset_wraps_transformer_blocks(tmp_path):
    # FSDP cannot run on this CPU-only machine: Lightning 2.6 rejects FSDPStrategy without
    # a GPU accelerator. The preset is checked up to the strategy object.
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config(["experiment=embedded_gpt", "trainer=fsdp"], tmp_path)
    strategy = instantiate(job_config(cfg).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    config = TransformerConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4)
    assert policy(module=Block(config), recurse=False, nonwrapped_numel=0)
    assert not policy(module=MLP(config), recurse=False, nonwrapped_numel=0)


def test_child_keeps_hydra_overrides_of_the_job():
    overrides = [
        "hydra.mode=MULTIRUN",
        "hydra.sweep.dir=/tmp/sweep",
        "hydra.run.dir=/tmp/run",
        "hydra/launcher=basic",
        "hydra.sweeper.params.seed=1,2",
        "hydra.job.name=other",
        "hydra.verbose=true",
        "hydra.job_logging.root.level=DEBUG",
    ]
    inherited = inherited_hydra_overrides(overrides)
    assert inherited == ["hydra.verbose=true", "hydra.job_logging.root.level=DEBUG"]


def test_override_values_are_quoted():
    assert quote_override_value("/runs/a,b=c d") == '"/runs/a,b=c d"'
    assert quote_override_value('/runs/say "hi"') == "'/runs/say \"hi\"'"
    with pytest.raises(ValueError, match="both kinds of quotes"):
        quote_override_value("/runs/'\"")


def test_validation_sampler_splits_without_repeats(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path
    )
    assert list(validation_sampler(TensorDataset(torch.zeros(5, 1)), trainer)) == [0, 2, 4]
    assert validation_sampler(TensorDataset(torch.zeros(5, 1)), None) is None
    with pytest.raises(ValueError, match="fewer than the 2 processes"):
        validation_sampler(TensorDataset(torch.zeros(1, 1)), trainer)


def test_ddp_multirun_goes_on_after_a_failed_job(tmp_path):
    # model.lr=10 diverges on both ranks. Lightning's process observer kills rank 0, the
    # sweep itself, when a child exits with an error, unless the job releases its children.
    result = run_train(["-m", *DDP_SMOKE, "model.lr=10,1e-3"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Sweep finished: 1 of 2 jobs failed" in output
    sweep = next((tmp_path / "logs" / "vae_digits" / "multiruns").iterdir())
    statuses = [json.loads((sweep / job / "summary.json").read_text())["status"] for job in "01"]
    assert statuses == ["failed", "finished"]
    assert len(wandb_run_files(sweep / "1")) == 1
