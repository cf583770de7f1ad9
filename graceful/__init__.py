"""graceful: one coordinated, observable, testable shutdown for any Python service.

Start with ``graceful.run(server)``: it serves, and at SIGTERM or Ctrl-C stops the server,
draining what is in flight. Register what must happen when the process stops with
``add_wrap_up_listener`` (stop taking new work, finish what is in flight) and
``add_shutdown_listener`` (release resources, once every wrap-up listener has finished); stop
it from anywhere with ``shutdown()``; end a worker loop on ``is_stopping()``.

Beside these names (``__all__``), one module per job: ``graceful.readiness`` (probes and the
drain delay), ``graceful.systemd``, ``graceful.testing``, ``graceful.adapters``, the hosts
(``graceful.gunicorn``, ``graceful.asgi``, ``graceful.celery``, ``graceful.dramatiq``,
``graceful.arq``), ``graceful.iteration`` (a job's walk that stops between two items) and
``graceful.lowlevel`` (the hooks integrations use). Each is loaded when first used: ``graceful.asgi.lifespan(app)`` works
after a plain ``import graceful``, which itself imports only the standard library and reads no
environment variable.
"""

from ._api import add_flush_listener as add_flush_listener
from ._api import add_reload_listener as add_reload_listener
from ._api import add_shutdown_listener as add_shutdown_listener
from ._api import add_wrap_up_listener as add_wrap_up_listener
from ._api import listen as listen
from ._api import run as run
from ._api import set_time_to_force_quit as set_time_to_force_quit
from ._api import set_wrap_up_timeout as set_wrap_up_timeout
from ._api import shutdown as shutdown
from ._api import signal_handlers as signal_handlers
from ._api import state as state
from ._api import status as status
from ._api import wait_for_shutdown as wait_for_shutdown
from ._api import wait_for_shutdown_async as wait_for_shutdown_async
from ._api import wait_for_wrap_up as wait_for_wrap_up
from ._api import wait_for_wrap_up_async as wait_for_wrap_up_async
from ._api import wrap_up as wrap_up
from ._checks import TYPE_CHECKING
from ._current import get_lifecycle as get_lifecycle
from ._current import is_stopping as is_stopping
from ._current import use as use
from ._lifecycle import Lifecycle as Lifecycle
from ._lifecycle import ReloadHandle as ReloadHandle
from ._lifecycle import State as State
from ._lifecycle import Status as Status
from ._listeners import ListenerState as ListenerState
from ._listeners import ListenerStatus as ListenerStatus
from ._listeners import Phase as Phase
from ._listeners import Waiter as Waiter
from ._service import Context as Context
from ._service import Service as Service

# What type checkers see for the lazy modules (below).
if TYPE_CHECKING:
    from . import adapters as adapters
    from . import arq as arq
    from . import asgi as asgi
    from . import celery as celery
    from . import dramatiq as dramatiq
    from . import gunicorn as gunicorn
    from . import iteration as iteration
    from . import lowlevel as lowlevel
    from . import readiness as readiness
    from . import systemd as systemd
    from . import testing as testing

__version__ = "0.1.0.dev0"
"""PEP 440: ``X.Y.Z`` for a release, ``X.Y.Z.devN`` between releases. Written only here: hatch
reads this line for the metadata; a release changes it and moves CHANGELOG.md's
``[Unreleased]`` under the new number."""

__all__ = [
    "Context",
    "Lifecycle",
    "ListenerState",
    "ListenerStatus",
    "Phase",
    "ReloadHandle",
    "Service",
    "State",
    "Status",
    "Waiter",
    "add_flush_listener",
    "add_reload_listener",
    "add_shutdown_listener",
    "add_wrap_up_listener",
    "get_lifecycle",
    "is_stopping",
    "listen",
    "run",
    "set_time_to_force_quit",
    "set_wrap_up_timeout",
    "shutdown",
    "signal_handlers",
    "state",
    "status",
    "use",
    "wait_for_shutdown",
    "wait_for_shutdown_async",
    "wait_for_wrap_up",
    "wait_for_wrap_up_async",
    "wrap_up",
]

for _name in (
    "Context",
    "Lifecycle",
    "ListenerState",
    "ListenerStatus",
    "Phase",
    "ReloadHandle",
    "Service",
    "State",
    "Status",
    "Waiter",
):
    globals()[_name].__module__ = "graceful"
del _name

_SUBMODULES = (
    "adapters",
    "arq",
    "asgi",
    "celery",
    "dramatiq",
    "gunicorn",
    "iteration",
    "lowlevel",
    "readiness",
    "systemd",
    "testing",
)
"""The modules reachable as attributes after ``import graceful``, each imported on first use.

Why: the README's and the docs' ``graceful.asgi.lifespan(app)`` after a plain ``import
graceful`` was an AttributeError, and importing every host up front would cost ``import
graceful`` its lightness (and import Celery). Not in ``__all__``, which names the objects of the
public face. Type checkers see them through the ``TYPE_CHECKING`` imports above."""

# Hidden from type checkers, which would accept any attribute through it.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name in _SUBMODULES:
            import importlib

            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


del TYPE_CHECKING
