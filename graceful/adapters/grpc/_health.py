"""The standard gRPC health service at the stop: NOT_SERVING first, then its ``Watch`` streams end.

Why: load balancers and gRPC clients ask the health service whether to send traffic, so it must
say NOT_SERVING before the port closes; and a client watching it holds a stream open that would
keep ``stop(grace)`` waiting for the whole grace. grpcio's servicers (sync and grpc.aio) expose
neither "every service" nor "end the streams" publicly, so this reads what they keep.
"""

from __future__ import annotations

import inspect
import logging

from ..._checks import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def check_health(health: Any) -> None:
    """Refuse a ``health=`` that is not a health servicer (None is fine)."""
    if health is not None and not (
        callable(getattr(health, "enter_graceful_shutdown", None)) or callable(getattr(health, "set", None))
    ):
        raise TypeError(
            f"health= takes a grpc_health.v1.health.HealthServicer (or its grpc.aio twin), not "
            f"{type(health).__name__}: an object with enter_graceful_shutdown() or set(service, status)"
        )


def not_serving(health: Any) -> list[Any]:
    """Every service the health servicer knows, "" included, to NOT_SERVING.

    Returns what is left to await (the grpc.aio servicer's methods are coroutines).
    """
    enter = getattr(health, "enter_graceful_shutdown", None)
    if callable(enter):
        results = [enter()]
    else:
        from grpc_health.v1 import health_pb2

        services = list(getattr(health, "_server_status", None) or [""])
        results = [health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING) for service in services]
    return [result for result in results if inspect.isawaitable(result)]


def end_sync_watches(health: Any) -> None:
    """End the sync health servicer's ``Watch`` streams (each has had its NOT_SERVING)."""
    lock = getattr(health, "_lock", None)
    callbacks = getattr(health, "_send_response_callbacks", None)
    if lock is None or not isinstance(callbacks, dict):
        return
    with lock:
        ending = [callback for group in callbacks.values() for callback in group]
    for callback in ending:
        try:
            # None ends the stream with status OK.
            callback(None)
        except Exception:
            # A watcher already gone.
            log.debug("ending a health Watch stream failed", exc_info=True)


def found_health(server: Any) -> Any:
    """The health servicer a sync server serves, if it was added the standard way."""
    state = getattr(server, "_state", None)
    handlers = [getattr(state, "registered_method_handlers", None) or {}]
    handlers += [
        getattr(generic, "_method_handlers", None) or {} for generic in getattr(state, "generic_handlers", ())
    ]
    for table in handlers:
        handler = table.get(HEALTH_CHECK) if isinstance(table, dict) else None
        servicer = getattr(getattr(handler, "unary_unary", None), "__self__", None)
        if callable(getattr(servicer, "enter_graceful_shutdown", None)) or callable(
            getattr(servicer, "set", None)
        ):
            return servicer
    return None
