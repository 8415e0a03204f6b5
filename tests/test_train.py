"""train.py end to end, run as a user runs it: a subprocess with real Hydra, Lightning and W&B."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_train
from wandb_records import read_config, read_history, read_run, read_summary

SMOKE = ["debug=smoke"]


def single_run_dir(cwd: Path, task_name: str) -> Path:
    runs = sorted((cwd / "logs" / task_name / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return runs[0]


def wandb_run_file(run_dir: Path) -> Path:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run file, found {files}"
    return files[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One smoke run of the default experiment, shared by the tests that inspect its output."""
    cwd = tmp_path_factory.mktemp("default_run")
    result = run_train([*SMOKE, "seed=0", "tags=[smoke]"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result, single_run_dir(cwd, "vae_digits")


def test_default_run_saves_resolved_config(default_run):
    _, _, run_dir = default_run
    config_text = (run_dir / "config.yaml").read_text()
    assert "${" not in config_text
    assert "seed: 0" in config_text
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert run_info["command"][0] == "train.py"


def test_default_run_saves_best_and_last_checkpoints(default_run):
    _, _, run_dir = default_run
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-") for name in checkpoints)


def test_default_run_saves_sample_grids(default_run):
    _, _, run_dir = default_run
    pngs = list((run_dir / "samples").glob("*.png"))
    assert pngs, "no sample PNG written"


def test_default_run_writes_csv_metrics(default_run):
    _, _, run_dir = default_run
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "train/loss" in rows[0]
    assert any(row.get("val/nelbo") for row in rows)


def test_default_run_summary_lists_metrics_and_paths(default_run):
    _, result, run_dir = default_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "val/nelbo" in summary["best"]
    assert "val/nelbo" in summary["final"]
    assert summary["last_checkpoint"].endswith("last.ckpt")
    assert Path(summary["best_checkpoint"]).is_file()
    assert summary["samples_dir"] == str((run_dir / "samples").resolve())
    assert "Run summary" in result.stdout


def test_wandb_offline_run_contains_logged_metrics(default_run):
    _, result, run_dir = default_run
    history = read_history(wandb_run_file(run_dir))
    train_losses = [row["train/loss"] for row in history if "train/loss" in row]
    val_nelbos = [row["val/nelbo"] for row in history if "val/nelbo" in row]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(train_losses) >= 1
    assert len(val_nelbos) == 1
    assert val_nelbos[0] == pytest.approx(summary["final"]["val/nelbo"], rel=1e-5)


def test_wandb_offline_run_contains_flattened_config(default_run):
    _, _, run_dir = default_run
    config = read_config(wandb_run_file(run_dir))
    # One dotted key per setting, so the runs table has a column for each.
    assert config["seed"] == 0
    assert config["model._target_"].endswith(".VAE")
    assert config["data.source"] == "digits"
    assert config["trainer.max_steps"] == 4
    assert not any(isinstance(value, dict) for value in config.values() if value != {})


def test_wandb_offline_run_carries_what_dashboards_compare(default_run):
    _, _, run_dir = default_run
    run_file = wandb_run_file(run_dir)
    run = read_run(run_file)
    assert run["group"] == "vae_digits"
    assert run["job_type"] == "train"
    assert run["tags"] == ["smoke"]
    summary = read_summary(run_file)
    assert summary["best/val/nelbo"] == pytest.approx(summary["val/nelbo"])
    # Sample grids arrive under the same keys at every validation.
    images = {
        key.rsplit("/", 1)[0]
        for row in read_history(run_file)
        for key, value in row.items()
        if key.startswith("samples/") and key.endswith("/_type") and value.startswith("images")
    }
    assert images == {"samples/generated", "samples/reconstructions"}
    assert json.loads((run_dir / "summary.json").read_text())["wandb"]["id"] == run["id"]


def test_wandb_offline_run_prints_sync_command(default_run):
    _, result, run_dir = default_run
    output = result.stdout + result.stderr
    assert "wandb sync" in output
    assert str(run_dir / "wandb") in output


def test_seed_makes_runs_reproducible(default_run, tmp_path):
    _, _, first_dir = default_run
    result = run_train([*SMOKE, "seed=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((first_dir / "summary.json").read_text())["final"]
    second = json.loads((single_run_dir(tmp_path, "vae_digits") / "summary.json").read_text())[
        "final"
    ]
    assert first["val/nelbo"] == second["val/nelbo"]
    assert first["train/loss"] == second["train/loss"]


def test_different_seeds_give_different_runs(default_run, tmp_path):
    _, _, first_dir = default_run
    result = run_train([*SMOKE, "seed=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((first_dir / "summary.json").read_text())["final"]
    other = json.loads((single_run_dir(tmp_path, "vae_digits") / "summary.json").read_text())[
        "final"
    ]
    assert first["val/nelbo"] != other["val/nelbo"]


def test_resume_continues_from_checkpoint(default_run, tmp_path):
    _, _, first_dir = default_run
    last = first_dir / "checkpoints" / "last.ckpt"
    steps_before = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    # last.ckpt is saved at the validation that ends epoch 0, before Lightning marks the
    # epoch complete, so the resumed run counts that epoch again: max_epochs leaves room.
    result = run_train(
        ["debug=smoke", "trainer.max_steps=8", "trainer.max_epochs=3", f"ckpt_path={last}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((single_run_dir(tmp_path, "vae_digits") / "summary.json").read_text())
    assert steps_before == 4
    assert resumed["global_step"] == 8


def test_invalid_config_exits_with_message(tmp_path):
    result = run_train(["model=gpt", "data=digits", "data.batch_size=0"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Invalid configuration (2 problems)" in output
    assert "model=gpt cannot train on data=digits" in output
    assert "data.batch_size=0" in output
    assert list((tmp_path / "logs").glob("*/runs/*")) == [], "a rejected run left its directory"


def test_missing_data_file_exits_with_message(tmp_path):
    missing = tmp_path / "missing.txt"
    result = run_train(["model=gpt", "data=text_file", f"data.path={missing}"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert str(missing) in output
    assert "Traceback" not in output
    assert not list((tmp_path / "logs").glob("*/runs/*/wandb"))


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    run_dir = tmp_path / "fixed_run"
    first = run_train([*SMOKE, f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    second = run_train([*SMOKE, f"hydra.run.dir={run_dir}"], tmp_path)
    output = second.stdout + second.stderr
    assert second.returncode == 2
    assert "already contains checkpoints" in output
    assert "resume=auto" in output
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def test_help_lists_config_groups(tmp_path):
    result = run_train(["--help"], tmp_path)
    assert result.returncode == 0
    for group in ("model:", "data:", "experiment:", "trainer:", "logger:", "debug:"):
        assert group in result.stdout


def test_cfg_job_prints_composed_config(tmp_path):
    result = run_train(["--cfg", "job", "experiment=shakespeare_char"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "n_layer: 4" in result.stdout
    assert "max_steps: 2000" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "task_name", "metric"),
    [
        (["experiment=embedded_gpt"], "gpt_embedded_text", "val/ppl"),
        (["model=gan", "model.fid.num_samples=16"], "gan_digits", "train/g_loss"),
    ],
)
def test_other_models_train_through_train_py(tmp_path, overrides, task_name, metric):
    result = run_train([*SMOKE, *overrides], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((single_run_dir(tmp_path, task_name) / "summary.json").read_text())
    assert metric in summary["final"]


def test_run_without_loggers_trains(tmp_path):
    result = run_train([*SMOKE, "logger=none"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path, "vae_digits")
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
