"""Shared fixtures: composing the real Hydra config and running train.py as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

# No test may reach the network: W&B always runs offline and never prompts for a login.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


def compose_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose conf/train.yaml as train.py would, with every path inside tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(
            config_name="train",
            overrides=[
                f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.log_dir={tmp_path / 'logs'}",
                f"paths.data_dir={tmp_path / 'data'}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg), read_write(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def job_config(cfg: DictConfig) -> DictConfig:
    """The config the task function receives: the composed config without its hydra node."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_train(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` in a subprocess from `cwd`, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GENLAB_DATA_DIR": str(cwd / "data")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def compose(tmp_path):
    def _compose(*overrides: str) -> DictConfig:
        return compose_config(list(overrides), tmp_path)

    yield _compose
    GlobalHydra.instance().clear()
