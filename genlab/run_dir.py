"""The run directory: what a run leaves behind so it can be found, resumed and traced."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import lightning
import torch
import torchmetrics
import wandb
from omegaconf import DictConfig, OmegaConf

from genlab.config_check import ConfigError
from genlab.ddp import is_global_zero

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: DictConfig, ckpt_path: str | None) -> Path:
    """Create the run directory and save the resolved config and the run's provenance.

    `ckpt_path` is the checkpoint the run resumes from, if any. Raises ConfigError when the
    directory already contains checkpoints of another run and this run does not resume from
    one of them, so that no earlier checkpoint is overwritten.

    Under DDP only global rank 0 checks and writes the directory. The other processes
    return its path.
    """
    run_dir = Path(cfg.paths.output_dir)
    if not is_global_zero():
        return run_dir
    checkpoint_dir = run_dir / "checkpoints"
    existing = sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    resuming_here = (
        ckpt_path is not None and Path(ckpt_path).resolve().parent == checkpoint_dir.resolve()
    )
    if existing and not resuming_here:
        raise ConfigError(
            [
                f"hydra.run.dir={str(run_dir)!r} already contains checkpoints of an earlier run "
                f"({', '.join(p.name for p in existing)}), and genlab never overwrites them. "
                "Continue that run with resume=auto, or pick a new hydra.run.dir."
            ]
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    changes = _config_changes(run_dir / "config.yaml", cfg) if resuming_here else {}
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info_path = run_dir / "run_info.json"
    if resuming_here and info_path.is_file():
        # A resumed run keeps the provenance of its first start and adds each resumption.
        run_info = json.loads(info_path.read_text())
        if changes:
            log.warning(
                "Resuming with settings that differ from the run's last start: %s",
                ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()),
            )
        run_info.setdefault("resumed", []).append(
            {"at": now, "from": str(ckpt_path), "command": command, "changed": changes}
        )
        write_json(info_path, run_info)
        return run_dir
    run_info = {
        "command": command,
        "started_at": now,
        "git_commit": _git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "torchmetrics": torchmetrics.__version__,
        "wandb": wandb.__version__,
    }
    write_json(info_path, run_info)
    return run_dir


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a temporary file and a rename.

    A reader, such as compare.py on a running run, then reads the old file or the new
    one, never half of one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _config_changes(saved_path: Path, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Return {key: (saved value, new value)} for the settings that differ from a saved config.

    The keys that choose the starting checkpoint (resume, ckpt_path) are left out.
    """
    if not saved_path.is_file():
        return {}
    saved = flatten_config(OmegaConf.to_container(OmegaConf.load(saved_path)))
    new = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    changes = {}
    for key in sorted(saved.keys() | new.keys()):
        if key in ("resume", "ckpt_path") or saved.get(key) == new.get(key):
            continue
        changes[key] = (saved.get(key), new.get(key))
    return changes


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {"model": {"lr": 1}} -> {"model.lr": 1}.

    Lists are values, not levels. An empty dict keeps its key, with {} as the value.
    """
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix.rstrip("."): node}
    flat = {}
    for key, value in node.items():
        flat.update(flatten_config(value, f"{prefix}{key}."))
    return flat


def _git_commit() -> str | None:
    """Commit of the source tree train.py runs from, with "-dirty" when files are modified."""
    source_dir = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if status.strip() else "")
