"""Listening sockets that outlive a process: inherited when one matches, else bound here.

Why: between an old process closing its port and a new one binding it, every connection is
refused (issue #25 measured 30,245 refused connections in 5 in-place restarts of a stdlib
server under load). A listening socket that is *inherited* is never closed in between: systemd
socket activation keeps it in the service manager (``LISTEN_FDS``), and an upgrade in place
(SIGUSR2 under ``run()``, see ``_upgrade``) hands the old generation's sockets to the new one,
as nginx's binary upgrade and cloudflare/tableflip do. ``SO_REUSEPORT`` is no hand-over: each
socket has its own accept queue, and closing one drops what waits in it.

``listen(address)`` is the one call a server makes: it returns the inherited socket bound to
``address`` when there is one, otherwise a new one bound here. Two ways a socket arrives:

* **systemd socket activation** (``sd_listen_fds(3)``): ``LISTEN_FDS`` sockets from fd 3, for
  this process only if ``LISTEN_PID`` is its pid, named by ``LISTEN_FDNAMES``.
* **the previous generation** (an upgrade in place): ``GRACEFUL_UPGRADE``, a protocol of
  graceful's own, e.g. ``from=1234 listen=5,6 ready=7 stderr=8 capture=9``. Not systemd's: its
  ``LISTEN_PID`` must be the pid of the process reading it, which a parent knows only after the
  child exists, and writing it there would take code run between ``fork`` and ``exec``, unsafe
  in a threaded process. So the fds keep their numbers (``Popen(pass_fds=...)``), each socket is
  told apart by the address it is bound to, and ``from`` must be this process's parent: a
  program the new generation starts later, which inherits the environment but not the fds,
  takes nothing. ``ready``, ``stderr`` and ``capture`` belong to ``_upgrade`` (``Handover``).

Both sets of variables are removed from ``os.environ`` once read (systemd's
``unset_environment``), and every inherited fd is made non-inheritable, so a program the service
starts does not take them for its own.

Matching: a TCP socket matches the same family, address and port; a port of 0 takes the first
inherited socket on that address, whatever its port (a service bound to port 0 keeps its port
across upgrades); a wildcard (``""``, ``0.0.0.0``) also takes systemd's usual ``ListenStream=8000``,
a dual-stack ``[::]:8000`` socket, which serves IPv4 too. A Unix socket matches its path (an
abstract one is written ``@name``). A new TCP socket gets ``SO_REUSEADDR`` (as every server sets
it, so that a restart need not wait for ``TIME_WAIT``); one on the IPv6 wildcard ``::`` is
dual-stack (``IPV6_V6ONLY`` off: IPv4 clients reach it too, as systemd's ``ListenStream=8000``
and Linux's default have it, whatever ``net.ipv6.bindv6only`` says); a stale Unix socket file
nobody listens on is replaced. An inherited socket that
no server asked for by the time every server has started is a misconfiguration (a unit passing
a socket the service never uses): ``report_unclaimed()`` names it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import threading

from ._checks import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = [
    "ENV_UPGRADE",
    "Handover",
    "Inherited",
    "describe",
    "inherited",
    "is_listening",
    "listen",
    "report_unclaimed",
    "take_handover",
    "unclaimed",
]

log = logging.getLogger("graceful")

ENV_UPGRADE = "GRACEFUL_UPGRADE"
SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
FIRST_FD = 3
"""``SD_LISTEN_FDS_START``: systemd passes its sockets from this fd on."""
SYSTEMD = "systemd"
PREVIOUS = "the previous generation"
_ACCEPTCONN: int | None = getattr(socket, "SO_ACCEPTCONN", None)
_HOST_PORT = re.compile(r"[^/\\]*:[0-9]+")


def describe(sock: socket.socket) -> str:
    """``127.0.0.1:8000``, ``[::1]:8000``, ``unix:/run/app.sock``, ``unix:@name`` (for logs)."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    family = sock.family
    if family in (socket.AF_INET, socket.AF_INET6):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    return f"unix:@{name[1:]}" if name.startswith("\0") else f"unix:{name}"


def is_listening(sock: socket.socket) -> bool:
    """A stream socket accepting connections (``SO_ACCEPTCONN``; where the platform lacks it,
    any bound stream socket)."""
    try:
        if sock.fileno() < 0 or sock.type != socket.SOCK_STREAM:
            return False
        if _ACCEPTCONN is None:
            return bool(sock.getsockname())
        return bool(sock.getsockopt(socket.SOL_SOCKET, _ACCEPTCONN))
    except OSError:
        return False


class Inherited:
    """A socket this process received: from ``systemd`` or from the previous generation."""

    __slots__ = ("claimed", "name", "origin", "sock")

    def __init__(self, sock: socket.socket, origin: str, name: str | None = None) -> None:
        self.sock = sock
        self.origin = origin
        self.name = name
        self.claimed = False

    def describe(self) -> str:
        named = f", named {self.name!r}" if self.name else ""
        return f"fd {self.sock.fileno()} ({describe(self.sock)}{named}, from {self.origin})"


class Handover:
    """What the previous generation handed down besides its sockets (``_upgrade`` uses it):
    ``parent``, its pid; ``ready``, the pipe to say "ready" on; ``stderr``, its own stderr, to
    write to once ready; ``capture``, the read end of the pipe this process's stderr is until then."""

    __slots__ = ("capture", "parent", "ready", "stderr")

    def __init__(self, parent: int, ready: int, stderr: int, capture: int) -> None:
        self.parent = parent
        self.ready = ready
        self.stderr = stderr
        self.capture = capture


class _Inheritance:
    """This process's inherited sockets and hand-over, read once (fds are the process's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read = False
        self.sockets: list[Inherited] = []
        self.handover: Handover | None = None

    def load(self, environ: MutableMapping[str, str]) -> None:
        """Read the environment (once; the caller holds the lock)."""
        if self.read:
            return
        self.read = True
        self.sockets = _from_systemd(environ)
        self.handover, passed = _from_previous(environ)
        self.sockets += passed


_INHERITANCE = _Inheritance()


def _adopt(fd: int, origin: str, name: str | None) -> Inherited | None:
    """The socket at ``fd``, made non-inheritable; None (and a warning) if it is not one."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        if is_socket:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.warning("inherited fd %d from %s is not a usable socket (%s): ignored", fd, origin, exc)
        return None
    if not is_socket:
        log.warning("inherited fd %d from %s is not a socket: ignored", fd, origin)
        return None
    return Inherited(sock, origin, name)


def _from_systemd(environ: MutableMapping[str, str]) -> list[Inherited]:
    pid, count, names = (environ.pop(name, "").strip() for name in SYSTEMD_VARIABLES)
    if not count:
        return []
    if pid != str(os.getpid()):
        log.debug("LISTEN_FDS=%s is for pid %s, not this process: ignored", count, pid or "(unset)")
        return []
    if not count.isdigit():
        log.warning("LISTEN_FDS=%r is not a number of sockets: ignored", count)
        return []
    labels = names.split(":") if names else []
    found = []
    for index in range(int(count)):
        label = labels[index] if index < len(labels) else None
        adopted = _adopt(FIRST_FD + index, SYSTEMD, None if label in (None, "", "unknown") else label)
        if adopted is not None:
            found.append(adopted)
    return found


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _from_previous(environ: MutableMapping[str, str]) -> tuple[Handover | None, list[Inherited]]:
    raw = environ.pop(ENV_UPGRADE, "").strip()
    if not raw:
        return None, []
    try:
        fields = dict(part.split("=", 1) for part in raw.split())
        parent = int(fields["from"])
        listening = _numbers(fields.get("listen", ""))
        handover = Handover(parent, int(fields["ready"]), int(fields["stderr"]), int(fields["capture"]))
    except (KeyError, ValueError):
        log.warning(
            "%s=%r cannot be read: ignored (graceful sets it for the next generation)", ENV_UPGRADE, raw
        )
        return None, []
    if parent != os.getppid():
        log.debug("%s is from pid %d, not this process's parent: ignored", ENV_UPGRADE, parent)
        return None, []
    for fd in (handover.ready, handover.stderr, handover.capture):
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("%s names fd %d, which is not open (%s): no hand-over", ENV_UPGRADE, fd, exc)
            return None, []
    found = [adopted for fd in listening if (adopted := _adopt(fd, PREVIOUS, None)) is not None]
    return handover, found


def inherited(environ: MutableMapping[str, str] | None = None) -> list[Inherited]:
    """Every socket this process inherited (read from the environment on the first call)."""
    with _INHERITANCE.lock:
        _INHERITANCE.load(os.environ if environ is None else environ)
        return list(_INHERITANCE.sockets)


def take_handover() -> Handover | None:
    """The previous generation's hand-over, once (None if there was none, or it was taken)."""
    with _INHERITANCE.lock:
        _INHERITANCE.load(os.environ)
        handover, _INHERITANCE.handover = _INHERITANCE.handover, None
        return handover


def unclaimed() -> list[Inherited]:
    """The inherited sockets no ``listen()`` took, still open."""
    with _INHERITANCE.lock:
        return [item for item in _INHERITANCE.sockets if not item.claimed and item.sock.fileno() >= 0]


def report_unclaimed() -> list[str]:
    """Warn once for each inherited socket no server asked for (``run()`` calls it once every
    server has started); returns the descriptions. One from the previous generation is closed:
    its port would queue connections that nothing accepts. systemd's stays with systemd."""
    lines = []
    for item in unclaimed():
        lines.append(item.describe())
        if item.origin == SYSTEMD:
            log.warning(
                "inherited socket %s: no server listens on it (graceful.listen() was never called "
                "for its address); connections to it wait unanswered. Remove it from the unit's "
                "socket, or listen on it",
                item.describe(),
            )
        else:
            log.warning(
                "inherited socket %s: no server of this generation listens on it: closed, so "
                "connections to it are refused rather than left waiting",
                item.describe(),
            )
            with _INHERITANCE.lock:
                item.claimed = True
            item.sock.close()
    return lines


# -- listen() ---------------------------------------------------------------------------------


class _Wanted:
    """A checked address: TCP (``family``, ``packed`` address, ``port``) or a Unix ``path``."""

    __slots__ = ("family", "host", "packed", "path", "port")

    def __init__(self, address: object) -> None:
        self.path: str | None = None
        self.host = ""
        self.port = 0
        self.family = socket.AF_INET
        self.packed = b""
        if isinstance(address, (tuple, list)):
            self._tcp(address)
        elif isinstance(address, (str, os.PathLike)):
            self._unix(address)
        else:
            raise TypeError(
                f"graceful.listen() takes (host, port) for TCP, such as ('127.0.0.1', 8000), or a "
                f"path for a Unix socket, not {address!r}"
            )

    def _tcp(self, address: tuple[object, ...] | list[object]) -> None:
        if len(address) != 2:
            raise ValueError(
                f"graceful.listen() takes (host, port), such as ('127.0.0.1', 8000), not {address!r}"
            )
        host, port = address
        if host is None:
            host = ""
        if not isinstance(host, str):
            raise TypeError(f"graceful.listen((host, port)): host is a str such as '127.0.0.1', not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"graceful.listen((host, port)): port is an int such as 8000, not {port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(
                f"graceful.listen((host, port)): port must be 0-65535 (0: any free port), not {port}"
            )
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self.host, self.port = host, port
        self.family, self.packed = _resolve(host, port)

    def _unix(self, address: str | os.PathLike[str] | os.PathLike[bytes]) -> None:
        path = os.fsdecode(address)
        if not path:
            raise ValueError("graceful.listen() was given an empty path: pass (host, port) or a socket path")
        if _HOST_PORT.fullmatch(path):
            raise ValueError(
                f"graceful.listen({path!r}): that looks like host:port; pass a tuple such as "
                f"('127.0.0.1', 8000) for TCP (a string is a Unix socket path)"
            )
        if not hasattr(socket, "AF_UNIX"):
            raise ValueError(f"graceful.listen({path!r}): Unix sockets are not available on this platform")
        self.path = "\0" + path[1:] if path.startswith("@") else path
        self.family = socket.AF_UNIX

    @property
    def wildcard(self) -> bool:
        return self.path is None and self.packed == bytes(len(self.packed))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:@{self.path[1:]}" if self.path.startswith("\0") else f"unix:{self.path}"
        return (
            f"[{self.host}]:{self.port}"
            if self.family == socket.AF_INET6
            else f"{self.host or '0.0.0.0'}:{self.port}"
        )

    def matches(self, sock: socket.socket) -> bool:
        if not is_listening(sock):
            return False
        try:
            name = sock.getsockname()
        except OSError:
            return False
        if self.path is not None:
            return sock.family == socket.AF_UNIX and _same_path(name, self.path)
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or (self.port and name[1] != self.port):
            return False
        packed = socket.inet_pton(sock.family, name[0])
        if sock.family == self.family:
            return packed == self.packed
        # A wildcard IPv4 request takes a dual-stack [::] socket (systemd's ListenStream=PORT).
        return (
            self.wildcard
            and self.family == socket.AF_INET
            and packed == bytes(16)
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        )


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, bytes]:
    """The family and packed address for ``host``: ``""`` is IPv4's wildcard (as socketserver
    has it); numeric addresses need no lookup; a name takes its first passive address."""
    if not host:
        return socket.AF_INET, bytes(4)
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, host)
        except OSError:
            continue
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, socket.inet_pton(family, str(sockaddr[0]))


def _same_path(name: object, path: str) -> bool:
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str) or not name:
        return False
    if name.startswith("\0") or path.startswith("\0"):
        return name == path
    return os.path.abspath(name) == os.path.abspath(path)


def _check_backlog(backlog: object) -> int | None:
    if backlog is None:
        return None
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"graceful.listen(backlog=...) takes an int such as 1024, or None, not {backlog!r}")
    if backlog < 0:
        raise ValueError(f"graceful.listen(backlog=...) must be 0 or more, not {backlog}")
    return backlog


def _take(wanted: _Wanted) -> Inherited | None:
    with _INHERITANCE.lock:
        _INHERITANCE.load(os.environ)
        for item in _INHERITANCE.sockets:
            if not item.claimed and wanted.matches(item.sock):
                item.claimed = True
                return item
    return None


def _stale(path: str) -> bool:
    """A socket file at ``path`` that nobody listens on any more (a crashed server's)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def _bind(wanted: _Wanted, backlog: int) -> socket.socket:
    sock = socket.socket(wanted.family, socket.SOCK_STREAM)
    try:
        if wanted.path is not None:
            try:
                sock.bind(wanted.path)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not _stale(wanted.path):
                    raise
                os.unlink(wanted.path)
                sock.bind(wanted.path)
        else:
            # Windows' SO_REUSEADDR lets another process steal the port.
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # [::] serves IPv4 too, where the platform has a dual stack.
            if wanted.family == socket.AF_INET6 and wanted.wildcard:
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((socket.inet_ntop(wanted.family, wanted.packed), wanted.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = str(exc.strerror or exc)
        raise OSError(exc.errno, f"cannot listen on {wanted}: {reason[:1].lower()}{reason[1:]}") from None
    return sock


def listen(address: object, *, backlog: object = None) -> socket.socket:
    """A listening socket for ``address``: inherited if one matches, else bound here.

    See ``graceful.listen`` for the whole promise. ``backlog`` None keeps an inherited socket's
    backlog and gives a new one ``socket.SOMAXCONN`` (the kernel caps it at ``somaxconn``).

    Raises:
        TypeError, ValueError: a bad address or backlog (before anything is bound).
        OSError: the address cannot be bound (in use, say); the message names it.
    """
    wanted = _Wanted(address)
    size = _check_backlog(backlog)
    found = _take(wanted)
    if found is not None:
        if size is not None:
            found.sock.listen(size)
        log.info(
            "listening on %s: inherited from %s (fd %d)",
            describe(found.sock),
            found.origin,
            found.sock.fileno(),
        )
        return found.sock
    sock = _bind(wanted, socket.SOMAXCONN if size is None else size)
    log.debug("listening on %s: bound here (fd %d)", describe(sock), sock.fileno())
    return sock
