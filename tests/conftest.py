"""Shared fixtures: composing the real Hydra config and running train.py as users do."""

from __future__ import annotations

import os
import signal
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


def run_script(
    script: str,
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` (train.py, eval.py, ...) in a subprocess from `cwd`, as users do.

    The script runs in a session of its own. On a timeout the whole session is killed,
    DDP processes that Lightning started included, so that none of them outlives the
    test, and the test fails with the output so far. `env` adds environment variables.
    """
    process = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GENLAB_DATA_DIR": str(cwd / "data"),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{script} {' '.join(args)} did not finish within {timeout} s:\n"
            f"{stdout[-3000:]}{stderr[-3000:]}"
        )
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_train(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` in a subprocess from `cwd`, as a user would."""
    return run_script("train.py", args, cwd, timeout)


@pytest.fixture
def compose(tmp_path):
    def _compose(*overrides: str) -> DictConfig:
        return compose_config(list(overrides), tmp_path)

    yield _compose
    GlobalHydra.instance().clear()
