"""graceful: one coordinated, observable, testable shutdown for any Python service.

The public face is exactly what ``__all__`` lists. Beside it: ``graceful.readiness`` (probes
and the drain delay), ``graceful.systemd``, ``graceful.testing``, ``graceful.adapters``, the
hosts (``graceful.gunicorn``, ``graceful.asgi``, ``graceful.celery``) and ``graceful.lowlevel``
(the hooks integrations use), each loaded only when used. ``import graceful`` imports only the
standard library, not ``asyncio``, and reads no environment variable. How the package is laid
out, and why, is in docs/architecture.md.
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
