"""A client that went away early: how the http adapter tells it from a real error.

Why: behind a load balancer clients leave all the time (the balancer resets its pooled
keep-alive connections, a health check closes once it has the status line), and the standard
library prints a traceback for each. But the same exceptions (``ConnectionResetError`` and its
kin) also come from a handler's own call to a backend, which *is* an error. So an exception
counts as "the client went away" only when the client's own socket shows the peer gone: the
kernel's TCP state on Linux, else a peek that consumes nothing.
"""

from __future__ import annotations

import select
import socket

__all__ = ["GONE", "TIMED_OUT", "describe_client", "peer_gone"]

# What a client going away raises on our side of its socket: a reset (RST) read or written, a
# write after it closed (EPIPE), an abort (Windows). ConnectionRefusedError, the fourth
# ConnectionError, only comes from connect(): the user's handler calling a backend.
GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux: struct tcp_info, state first
TCP_CLOSE = 7  # tcpi_state of a connection reset while our end is still open
TIMED_OUT = "Request timed out: %r"  # BaseHTTPRequestHandler's line (3.6 to 3.13 alike)


def describe_client(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address) if address else "(unnamed socket)"


def peer_gone(sock: object) -> bool:
    """The peer has closed or reset ``sock``: end of stream or an error waits on it.

    A live connection, merely quiet or with bytes still to read, is not gone. On Linux the
    kernel's TCP state says it first (CLOSE: reset, even with unread bytes left before the
    reset); else a peek at the raw socket (a TLS socket's bytes too, undecrypted) without
    consuming anything or blocking.
    """
    if not isinstance(sock, socket.socket):
        return False  # a datagram server's (data, socket): no connection to lose
    try:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp and TCP_INFO is not None and sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_CLOSE:
            return True
        if hasattr(select, "poll"):  # no FD_SETSIZE limit: a busy server has fds over 1024
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and not socket.socket.recv(sock, 1, socket.MSG_PEEK)
    except GONE:
        return True
    except (OSError, ValueError):  # closed already, or not a stream: cannot tell, so not gone
        return False
