"""Adapters: turn a server object into a ``graceful.Service``.

``adapt(obj)`` picks the adapter. Known third-party servers are recognised by the top-level
package their class comes from, *without importing it*: ``import graceful`` never imports
uvicorn, grpc, aiohttp, redis, rq or asyncio; an adapter module (and its library) is imported
only when an object of that library is handed to ``adapt()``.
"""

from __future__ import annotations

import importlib

from .._checks import TYPE_CHECKING, check_listener, is_coroutine_function, is_generator_function
from .._service import Service, is_service
from ._basic import (
    CallableService,
    CoroutineFunctionService,
    CoroutineService,
    SocketServerService,
    StartStopService,
    takes_context,
)

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CallableService",
    "CoroutineFunctionService",
    "CoroutineService",
    "SocketServerService",
    "StartStopService",
    "adapt",
]

# top-level package of the server's class -> our adapter module (imported on first use)
_BY_PACKAGE: dict[str, str] = {
    "uvicorn": "graceful.adapters.uvicorn",
    "aiohttp": "graceful.adapters.aiohttp",
    "grpc": "graceful.adapters.grpc",
    "rq": "graceful.adapters.rq",
    "subprocess": "graceful.adapters.process",
    "multiprocessing": "graceful.adapters.process",
    "concurrent": "graceful.adapters.tasks",
    "threading": "graceful.adapters.tasks",
    "http": "graceful.adapters.http",
    "socketserver": "graceful.adapters.http",
    "wsgiref": "graceful.adapters.http",
}


def _packages(obj: object) -> list[str]:
    seen: list[str] = []
    for cls in type(obj).__mro__:
        top = (cls.__module__ or "").split(".")[0]
        if top and top not in seen:
            seen.append(top)
    return seen


def _known(obj: object) -> Service | None:
    for package in _packages(obj):
        module_name = _BY_PACKAGE.get(package)
        if module_name is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            # That adapter has not landed (yet): fall back to the generic shapes.
            continue
        service: Service | None = module.adapt(obj)
        if service is not None:
            return service
    return None


def _for_callable(obj: object) -> Service:
    # A generator function would hand back a generator and never run; one that needs
    # arguments would fail only in its thread: both are a TypeError here, at the call. One
    # argument is the exception: ``worker(ctx)`` is given its context (CallableService).
    if not is_coroutine_function(obj) and not is_generator_function(obj) and takes_context(obj):  # type: ignore[arg-type]
        return CallableService(obj, with_context=True)  # type: ignore[arg-type]
    fn = check_listener(obj, "graceful.run")
    if is_coroutine_function(fn):
        # An async def, not called yet.
        return CoroutineFunctionService(fn)  # type: ignore[arg-type]
    return CallableService(fn, with_context=False)


def adapt(obj: Any) -> Service:
    """The ``Service`` for ``obj``: itself if it already is one, else the adapter that fits.

    Raises:
        TypeError: graceful does not know how to run ``obj``; the message lists what it accepts.
    """
    if is_service(obj):
        return obj  # type: ignore[no-any-return]
    known = _known(obj)
    if known is not None:
        return known
    if hasattr(obj, "__await__") or type(obj).__name__ == "coroutine":
        return CoroutineService(obj)
    if callable(getattr(obj, "serve_forever", None)) and callable(getattr(obj, "shutdown", None)):
        return SocketServerService(obj)
    if callable(getattr(obj, "start", None)) and callable(getattr(obj, "stop", None)):
        return StartStopService(obj)
    if callable(obj):
        return _for_callable(obj)
    raise TypeError(
        f"graceful.run() does not know how to run {type(obj).__module__}.{type(obj).__qualname__}: "
        "pass an object with serve_forever() and shutdown(), one with start() and stop(), a known "
        "server (uvicorn.Server, grpc server, aiohttp Application, subprocess.Popen, Thread, "
        "Executor), a coroutine, a blocking callable that polls graceful.is_stopping() (or takes its graceful.Context), a "
        "graceful.Service, or a list of these"
    )
