"""Downloads that fail fast on an offline machine instead of hanging."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the default socket timeout for the duration of the block.

    Libraries that open their own connections (torchvision's dataset downloads, torch hub)
    take no timeout argument; they inherit this default.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
