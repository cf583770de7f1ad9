"""graceful: one coordinated, observable, testable shutdown for any Python service.

The public face is exactly what ``__all__`` lists; everything else lives in private modules.
``import graceful`` imports only the standard library, and not ``asyncio``.
"""

from ._default import add_reload_listener as add_reload_listener
from ._default import add_shutdown_listener as add_shutdown_listener
from ._default import add_wrap_up_listener as add_wrap_up_listener
from ._default import get_lifecycle as get_lifecycle
from ._default import is_stopping as is_stopping
from ._default import run as run
from ._default import set_time_to_force_quit as set_time_to_force_quit
from ._default import shutdown as shutdown
from ._default import signal_handlers as signal_handlers
from ._default import state as state
from ._default import status as status
from ._default import use as use
from ._default import wait_for_shutdown as wait_for_shutdown
from ._default import wait_for_shutdown_async as wait_for_shutdown_async
from ._default import wrap_up as wrap_up
from ._lifecycle import Lifecycle as Lifecycle
from ._lifecycle import ReloadHandle as ReloadHandle
from ._listeners import Waiter as Waiter
from ._service import Context as Context
from ._service import Service as Service
from ._status import ListenerStatus as ListenerStatus
from ._status import State as State
from ._status import Status as Status

__version__ = "0.1.0.dev0"

__all__ = [
    "Context",
    "Lifecycle",
    "ListenerStatus",
    "ReloadHandle",
    "Service",
    "State",
    "Status",
    "Waiter",
    "add_reload_listener",
    "add_shutdown_listener",
    "add_wrap_up_listener",
    "get_lifecycle",
    "is_stopping",
    "run",
    "set_time_to_force_quit",
    "shutdown",
    "signal_handlers",
    "state",
    "status",
    "use",
    "wait_for_shutdown",
    "wait_for_shutdown_async",
    "wrap_up",
]

for _name in (
    "Context",
    "Lifecycle",
    "ListenerStatus",
    "ReloadHandle",
    "Service",
    "State",
    "Status",
    "Waiter",
):
    globals()[_name].__module__ = "graceful"
del _name
