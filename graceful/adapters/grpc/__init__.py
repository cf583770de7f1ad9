"""gRPC servers (``grpc.Server`` and ``grpc.aio.Server``) under ``graceful.run``.

Why: grpcio has no signal handling of its own, and its stop is easy to get wrong:
``Server.stop(grace)`` returns at once (the returned event says when it is done),
``wait_for_termination()`` returns True on *timeout*, and Ctrl-C does not get through during
an RPC (grpc #40834). Load balancers and gRPC clients ask the standard health service whether
to send traffic, so it must say NOT_SERVING before the port closes; and a client watching it
(``Health/Watch``, gRPC's client-side health checking) holds a stream open that would keep
``stop(grace)`` waiting for the whole grace.

* serve: ``start()`` (ports were added by the caller), "started", then block until the server
  has terminated.
* wrap-up: the health service (given, or found among a sync server's handlers) turns every
  service it knows NOT_SERVING (``enter_graceful_shutdown()``: for good, as graceful's own
  readiness); the drain delay (still serving, already not-serving to probes). In a pause that
  is all: the server keeps serving RPCs that still come, and the shutdown that follows stops it.
  At shutdown: the health ``Watch`` streams end (after their NOT_SERVING), then
  ``stop(grace=remaining budget + GRACE_MARGIN)``, *waited for* until graceful's wrap-up
  timeout: new RPCs are refused, RPCs in flight, unary and streaming, complete.
* wrap-up timeout: each RPC still running is logged (method, peer, age) when the server has
  this module's interceptor (gRPC offers no other way to see them; without it a sync server's
  count is logged), then ``stop(0)`` cancels them (their clients get UNAVAILABLE); the lifecycle
  is marked failed (exit code 1) and the shutdown phase starts. A handler's thread cannot be
  stopped: it runs on, and the deadline stays armed for it.
* deadline: the same for what is still there (a handler that went on), then ``stop(0)``.

The package: ``_tracking`` (the interceptors that see the RPCs under way), ``_health`` (the
health service at the stop), ``_sync`` (``grpc.Server``) and ``_aio`` (``grpc.aio.Server``).
The module's settings, ``CUT_WAIT`` and ``GRACE_MARGIN``, are still importable from here, as
before the split.
"""

from __future__ import annotations

import grpc
import grpc.aio

from ._aio import GrpcAioService
from ._sync import GrpcService
from ._tracking import CUT_WAIT as CUT_WAIT
from ._tracking import GRACE_MARGIN as GRACE_MARGIN
from ._tracking import AioRpcInterceptor, RpcInterceptor, aio_interceptor, interceptor

__all__ = [
    "AioRpcInterceptor",
    "GrpcAioService",
    "GrpcService",
    "RpcInterceptor",
    "adapt",
    "aio_interceptor",
    "interceptor",
]


def adapt(obj: object) -> GrpcService | GrpcAioService | None:
    """The service for a ``grpc.Server`` or ``grpc.aio.Server``; None for anything else."""
    if isinstance(obj, grpc.aio.Server):
        return GrpcAioService(obj)
    if isinstance(obj, grpc.Server):
        return GrpcService(obj)
    return None
