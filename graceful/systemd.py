"""systemd's notify protocol (``sd_notify``), with no dependency.

Why here: our users deploy under systemd (``Type=notify``) and Kubernetes; a service that says
``READY=1`` only once it accepts work, and ``STOPPING=1`` as soon as it stops accepting, lets
the supervisor order restarts and dependencies correctly. The pytest fixture
``graceful_process`` listens on the same protocol to know when a child is ready.

``NOTIFY_SOCKET`` may be a filesystem path or an abstract socket (``@name``). When it is unset,
every function here is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger("graceful")


def _address(raw: str) -> str:
    return "\0" + raw[1:] if raw.startswith("@") else raw


def notify(*messages: str) -> bool:
    """Send ``messages`` (e.g. ``"READY=1"``, ``"STATUS=draining"``) in one datagram.

    Returns True if sent; False if ``NOTIFY_SOCKET`` is unset or the send failed (logged at
    DEBUG: a supervisor that went away must not break the service).
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not messages:
        return False
    payload = "\n".join(messages).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(_address(raw))
            sock.sendall(payload)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", raw, exc)
        return False
    return True
