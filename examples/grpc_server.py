"""A gRPC server under graceful.run, with the standard health service.

Run it (``PORT`` sets the port, 50051 by default), then from another terminal:

    python -c "import grpc; c = grpc.insecure_channel('127.0.0.1:50051'); \
print(list(c.unary_stream('/demo.Ticker/Ticks')(b'20')))"

and press Ctrl-C in the server's terminal during the stream: the health service turns
NOT_SERVING, new RPCs are refused, the stream in flight sends all its ticks, and the process
exits 0. With ``GRACEFUL_FORCE_QUIT=1`` the stream outlives the wrap-up timeout (0.8 s of that
budget): the log names it (``dropped request RPC /demo.Ticker/Ticks ... at the wrap-up
timeout``), its client gets UNAVAILABLE, and the exit code is 1.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

import graceful
from graceful.adapters.grpc import interceptor


def ticks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """A server-streaming RPC: ``n`` ticks (the request, 5 by default), one every 0.2 s."""
    for i in range(int(request or b"5")):
        if i:
            time.sleep(0.2)  # some work
        yield str(i).encode()


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A unary RPC."""
    return request


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # interceptor(): graceful names each RPC it cuts (at the wrap-up timeout, or the deadline).
    server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=[interceptor()])
    handlers = {
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("demo.Ticker", handlers)])
    # The health service: graceful finds it on the server and turns it NOT_SERVING at wrap-up.
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{os.environ.get('PORT', '50051')}")
    return graceful.run(server)


if __name__ == "__main__":
    sys.exit(main())
