"""W&B mode selection: online only with credentials and a reachable server, never a hang."""

from __future__ import annotations

import socket
import time

import pytest

from genlab.loggers import resolve_wandb_mode, wandb_logger


def closed_loopback_port() -> int:
    """A loopback port with no listener: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return monkeypatch


def test_env_mode_takes_precedence(clean_wandb_env):
    clean_wandb_env.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"


def test_dryrun_env_mode_means_offline(clean_wandb_env):
    clean_wandb_env.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("auto") == "offline"


def test_explicit_mode_is_kept(clean_wandb_env):
    assert resolve_wandb_mode("offline") == "offline"


def test_auto_without_api_key_is_offline(clean_wandb_env):
    assert resolve_wandb_mode("auto") == "offline"


def test_auto_with_unreachable_server_is_offline_quickly(clean_wandb_env):
    clean_wandb_env.setenv("WANDB_API_KEY", "0" * 40)
    clean_wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_loopback_port()}")
    start = time.monotonic()
    assert resolve_wandb_mode("auto") == "offline"
    assert time.monotonic() - start < 5


def test_auto_with_netrc_key_and_server_is_online(clean_wandb_env, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        host, port = server.getsockname()
        (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'0' * 40}\n")
        clean_wandb_env.setenv("WANDB_BASE_URL", f"http://{host}:{port}")
        assert resolve_wandb_mode("auto") == "online"


def test_invalid_mode_is_rejected(clean_wandb_env, tmp_path):
    with pytest.raises(ValueError, match="logger.wandb.mode='sometimes'"):
        wandb_logger(mode="sometimes", save_dir=str(tmp_path))
