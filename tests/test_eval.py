"""eval.py: tiny runs trained with train.py, then evaluated as a user evaluates them.

Each model family trains once per module. The end-to-end checks run `python eval.py` in a
subprocess. The checks of settings and data errors call `evaluate` in this process on a
composed config, because that is faster and shows the exception.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import CONF_DIR, job_config, run_script, run_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from image_files import write_mnist
from omegaconf import DictConfig, open_dict, read_write
from wandb_records import read_run

from eval import evaluate
from genlab.checkpoints import CheckpointError
from genlab.config_check import ConfigError

# One training epoch of 4 batches, validated on the whole validation split.
SMOKE = ["debug=smoke", "seed=0", "logger=csv", "trainer.limit_val_batches=1.0"]
TRAIN_ARGS = {
    "vae": [*SMOKE, "model.width=8", "model.fid.every_n_epochs=1", "model.fid.num_samples=64"],
    # A GAN counts two optimizer steps per batch: 8 steps are the 4 batches of the epoch.
    "gan": [
        *SMOKE,
        "experiment=digits_gan",
        "model.generator_width=8",
        "model.discriminator_width=8",
        "model.fid.num_samples=64",
        "trainer.max_steps=8",
    ],
    "gpt": [
        *SMOKE,
        "experiment=embedded_gpt",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.sample_length=8",
        "data.block_size=16",
        "data.batch_size=64",
    ],
}
TASK_NAMES = {"vae": "vae_digits", "gan": "gan_digits", "gpt": "gpt_embedded_text"}


def run_eval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python eval.py ARGS` in a subprocess from `cwd`, as a user would."""
    return run_script("eval.py", args, cwd)


def train_run(family: str, cwd: Path) -> Path:
    result = run_train(TRAIN_ARGS[family], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (cwd / "logs" / TASK_NAMES[family] / "runs").iterdir()
    return run_dir


def final_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())["final"]


def read_records(ckpt_path: Path) -> list[dict]:
    lines = ckpt_path.with_name(f"{ckpt_path.stem}.eval.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def eval_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/eval.yaml as eval.py would, with its output in `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg), read_write(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir.parent)
    HydraConfig.instance().set_config(cfg)
    return job_config(cfg)


@pytest.fixture
def evaluate_with(tmp_path):
    """Run `evaluate` in this process with eval.py overrides; no loggers unless given."""

    def _evaluate(*overrides: str) -> dict[str, float]:
        return evaluate(eval_config(["logger=none", *overrides], tmp_path / "eval"))

    yield _evaluate
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    return train_run("vae", tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    return train_run("gan", tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    return train_run("gpt", tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="module")
def vae_eval(vae_run):
    """eval.py on the VAE's last.ckpt with the default settings and loggers (CSV, W&B offline)."""
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    result = run_eval([f"ckpt_path={ckpt}", "logger=default"], vae_run.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ckpt, result


# Reproduction of the metrics each run logged for its last checkpoint


def test_vae_eval_reproduces_validation_metrics(vae_run, vae_eval):
    ckpt, _ = vae_eval
    logged = final_metrics(vae_run)
    metrics = read_records(ckpt)[0]["metrics"]

    for key in ("val/nelbo", "val/bpd", "val/recon", "val/kl", "val/fid_randconv_64"):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-6), key
    assert metrics["val/nll_iwae_100"] < metrics["val/nelbo"]
    assert metrics["val/kid_randconv_64"] > 0
    assert metrics["val/kid_randconv_64_std"] > 0


def test_gan_eval_reproduces_fid(gan_run):
    ckpt = gan_run / "checkpoints" / "last.ckpt"
    result = run_eval([f"ckpt_path={ckpt}", "logger=csv"], gan_run.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = read_records(ckpt)[0]["metrics"]
    logged = final_metrics(gan_run)
    assert metrics["val/fid_randconv_64"] == pytest.approx(logged["val/fid_randconv_64"], rel=1e-6)
    assert set(metrics) == {
        "val/fid_randconv_64",
        "val/kid_randconv_64",
        "val/kid_randconv_64_std",
    }


def test_gpt_eval_reproduces_loss_ppl_bpt(gpt_run):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    result = run_eval([f"ckpt_path={ckpt}", "logger=csv"], gpt_run.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = read_records(ckpt)[0]["metrics"]
    logged = final_metrics(gpt_run)
    assert set(metrics) == {"val/loss", "val/ppl", "val/bpt"}
    for key in metrics:
        assert metrics[key] == pytest.approx(logged[key], rel=1e-6), key


# What an evaluation records


def test_eval_record_contents(vae_run, vae_eval):
    ckpt, _ = vae_eval
    record = read_records(ckpt)[0]

    assert record["checkpoint"] == str(ckpt.resolve())
    assert record["weights"] == "raw"
    assert record["epoch"] == 0
    assert record["global_step"] == 4
    assert record["split"] == "val"
    assert record["data"]["source"] == "digits"
    assert record["settings"]["fid"] == {
        "extractor": "randconv",
        "num_samples": 64,
        "inception_weights_path": None,
    }
    assert record["settings"]["kid"] == {"subsets": 100, "subset_size": 32}
    assert record["settings"]["iwae_samples"] == 100
    assert record["settings"]["precision"] == "32-true"
    assert record["timestamp"]


def test_eval_files_go_to_eval_dir(vae_run, vae_eval):
    ckpt, _ = vae_eval
    record = read_records(ckpt)[0]
    eval_dir = Path(record["eval_dir"])

    assert eval_dir.parent == (vae_run / "eval").resolve()
    assert json.loads((eval_dir / "eval.json").read_text()) == record
    assert (eval_dir / "eval.log").is_file()
    assert (eval_dir / ".hydra" / "config.yaml").is_file()
    with open(eval_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert float(rows[-1]["val/nelbo"]) == pytest.approx(record["metrics"]["val/nelbo"])


def test_eval_wandb_run_joins_training_group(vae_eval):
    ckpt, _ = vae_eval
    record = read_records(ckpt)[0]
    eval_dir = Path(record["eval_dir"])
    (run_file,) = (eval_dir / "wandb").glob("offline-run-*/run-*.wandb")

    run = read_run(run_file)

    assert run["job_type"] == "eval"
    assert run["group"] == "vae_digits"
    assert run["name"] == "eval-val-last"
    assert record["wandb"]["id"] == run["id"]


def test_second_eval_appends_record(vae_run, vae_eval, evaluate_with):
    ckpt, _ = vae_eval
    before = ckpt.with_name("last.eval.jsonl").read_text().splitlines()

    metrics = evaluate_with(f"ckpt_path={ckpt}", "fid=null", "iwae_samples=4")

    after = ckpt.with_name("last.eval.jsonl").read_text().splitlines()
    assert len(after) == len(before) + 1
    assert after[: len(before)] == before
    added = json.loads(after[-1])
    assert added["metrics"] == metrics
    assert added["settings"]["fid"] is None
    assert "val/nll_iwae_4" in metrics
    assert metrics["val/nelbo"] == json.loads(before[0])["metrics"]["val/nelbo"]


def test_eval_on_mnist_test_split(vae_run, evaluate_with, tmp_path):
    write_mnist(tmp_path / "data", num_train=20, num_test=12)

    metrics = evaluate_with(
        f"ckpt_path={vae_run / 'checkpoints' / 'last.ckpt'}",
        "split=test",
        "data=mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.image_size=16",
        "data.num_workers=0",
        "fid.num_samples=12",
        "iwae_samples=2",
    )

    assert sorted(metrics) == [
        "test/bpd",
        "test/bpd_iwae_2",
        "test/fid_randconv_12",
        "test/kid_randconv_12",
        "test/kid_randconv_12_std",
        "test/kl",
        "test/nelbo",
        "test/nll_iwae_2",
        "test/recon",
    ]


# Rejected settings, checkpoints and data


def test_invalid_settings_listed_together(evaluate_with, tmp_path):
    with pytest.raises(ConfigError) as error:
        evaluate_with(
            f"ckpt_path={tmp_path / 'any.ckpt'}",
            "split=train",
            "weights=average",
            "fid.num_samples=1",
            "fid.extractor=clip",
            "kid.subset_size=1",
            "iwae_samples=0",
        )

    message = str(error.value)
    assert "(6 problems)" in message
    for text in (
        "split='train'",
        "weights='average'",
        "fid.num_samples=1",
        "fid.extractor='clip'",
        "kid.subset_size=1",
        "iwae_samples=0",
    ):
        assert text in message


def test_misspelt_added_setting_rejected(evaluate_with, tmp_path):
    with pytest.raises(ConfigError) as error:
        evaluate_with(f"ckpt_path={tmp_path / 'any.ckpt'}", "+splt=test")
    assert "+splt is not a setting of eval.py (did you mean 'split'?)" in str(error.value)


def test_missing_checkpoint_rejected(evaluate_with, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_with(f"ckpt_path={tmp_path / 'missing.ckpt'}")


def test_fid_and_iwae_on_gpt_rejected(gpt_run, evaluate_with):
    with pytest.raises(ConfigError) as error:
        evaluate_with(
            f"ckpt_path={gpt_run / 'checkpoints' / 'last.ckpt'}",
            "fid.num_samples=100",
            "iwae_samples=10",
        )

    message = str(error.value)
    assert "fid.num_samples=100 is set, but GPT is a text model" in message
    assert "iwae_samples=10 is set, but only the VAE" in message


def test_gan_without_fid_rejected(gan_run, evaluate_with):
    with pytest.raises(ConfigError, match="remove fid=null"):
        evaluate_with(f"ckpt_path={gan_run / 'checkpoints' / 'last.ckpt'}", "fid=null")


def test_kid_subset_larger_than_samples_rejected(vae_run, evaluate_with):
    with pytest.raises(ConfigError, match="kid.subset_size=65 is larger than fid.num_samples=64"):
        evaluate_with(f"ckpt_path={vae_run / 'checkpoints' / 'last.ckpt'}", "kid.subset_size=65")


@pytest.mark.parametrize("family", ["vae", "gpt"])
def test_missing_test_split_rejected(family, vae_run, gpt_run, evaluate_with):
    run_dir = vae_run if family == "vae" else gpt_run

    with pytest.raises(ConfigError) as error:
        evaluate_with(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "split=test")

    message = str(error.value)
    assert "split=test is not available" in message
    assert "Use split=val" in message
    assert "data=mnist" in message


def test_data_of_other_shape_rejected(vae_run, gpt_run, evaluate_with):
    with pytest.raises(ConfigError, match="data.image_size=28 .* differs .* image_size=16"):
        evaluate_with(f"ckpt_path={vae_run / 'checkpoints' / 'last.ckpt'}", "data=mnist")
    with pytest.raises(ConfigError, match="provides image data, but the checkpoint holds a GPT"):
        evaluate_with(f"ckpt_path={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=digits")
    with pytest.raises(ConfigError, match="tokenizer of data=<preset> \\(byte, 256 tokens\\)"):
        evaluate_with(
            f"ckpt_path={gpt_run / 'checkpoints' / 'last.ckpt'}",
            "data=embedded_text",
            "data.tokenizer=byte",
            "data.block_size=16",
        )


def test_rejected_eval_writes_nothing(vae_run, vae_eval, tmp_path):
    ckpt, _ = vae_eval
    eval_dirs = sorted((vae_run / "eval").iterdir())
    records = ckpt.with_name("last.eval.jsonl").read_text()
    missing = tmp_path / "nowhere" / "checkpoints" / "last.ckpt"

    rejected = run_eval([f"ckpt_path={ckpt}", "split=train"], tmp_path)
    not_found = run_eval([f"ckpt_path={missing}"], tmp_path)

    assert rejected.returncode == 2
    assert "split='train' is invalid" in rejected.stdout + rejected.stderr
    assert "Traceback" not in rejected.stdout + rejected.stderr
    assert sorted((vae_run / "eval").iterdir()) == eval_dirs
    assert ckpt.with_name("last.eval.jsonl").read_text() == records
    assert not_found.returncode == 2
    assert "does not exist" in not_found.stdout + not_found.stderr
    assert not (tmp_path / "nowhere").exists()
