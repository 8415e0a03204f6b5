"""Weights & Biases set-up that falls back to offline mode instead of waiting for the network."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import wandb
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_URL = "https://api.wandb.ai"
# Seconds to wait for the W&B server before falling back to offline mode.
CONNECT_TIMEOUT_S = 3.0


def wandb_logger(
    mode: str = "auto",
    project: str = "genlab",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    job_type: str = "train",
    save_dir: str = ".",
) -> WandbLogger:
    """Build a WandbLogger, online only when credentials are set and the server responds.

    In "auto" mode the logger runs offline when there is no API key (WANDB_API_KEY or an
    entry for the W&B host in ~/.netrc) or when the server cannot be reached within a few
    seconds. Offline runs are written under `<save_dir>/wandb/` and can be uploaded later
    with `wandb sync`.
    """
    if mode not in WANDB_MODES:
        raise ValueError(
            f"logger.wandb.mode={mode!r} is invalid: use one of {', '.join(WANDB_MODES)}"
        )

    resolved = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if resolved == "offline":
        log.info(
            "W&B runs offline; upload this run later with: wandb sync %s",
            Path(save_dir).resolve() / "wandb" / "offline-run-*",
        )
    return WandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=list(tags) if tags else None,
        job_type=job_type,
        save_dir=save_dir,
        offline=resolved == "offline",
        mode=resolved,
        # The run summary gives the sync command; W&B's own end-of-run history table would
        # push it out of view.
        settings=wandb.Settings(quiet=True),
    )


def resolve_wandb_mode(mode: str) -> str:
    """Return "online", "offline" or "disabled" for the configured mode and this machine."""
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        # wandb also accepts "dryrun" as an old name of "offline".
        env_mode = "offline" if env_mode == "dryrun" else env_mode
        if env_mode != mode and mode != "auto":
            log.info("WANDB_MODE=%s overrides logger.wandb.mode=%s", env_mode, mode)
        return env_mode
    if mode != "auto":
        return mode

    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL))
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    if not _has_api_key(host):
        log.info("No W&B API key found (WANDB_API_KEY or ~/.netrc), so W&B runs offline")
        return "offline"
    if not _is_reachable(host, port):
        log.info("W&B server %s:%d is unreachable, so W&B runs offline", host, port)
        return "offline"
    return "online"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def _is_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False
