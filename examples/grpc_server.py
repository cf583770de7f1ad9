"""A gRPC server under graceful.run, with the standard health service.

Run it, then (from another terminal, with grpcio installed):

    python -c "import grpc; c = grpc.insecure_channel('127.0.0.1:50051'); \
print(list(c.unary_stream('/demo.Ticker/Ticks')(b'5')))"

and press Ctrl-C during the stream: the health service turns NOT_SERVING, new RPCs are
refused, the stream in flight sends all its messages, and the process exits 0.
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
from graceful.adapters.grpc import GrpcService, RpcTracker


def ticks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """A server-streaming RPC: ``n`` ticks, one every 0.2 s."""
    for i in range(int(request or b"5")):
        time.sleep(0.2)  # some work
        yield str(i).encode()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tracker = RpcTracker()  # names the RPCs dropped at the force-quit deadline
    server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=[tracker.interceptor])
    handlers = {"Ticks": grpc.unary_stream_rpc_method_handler(ticks)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("demo.Ticker", handlers)])
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{os.environ.get('PORT', '50051')}")
    return graceful.run(GrpcService(server, health=checks, tracker=tracker))


if __name__ == "__main__":
    sys.exit(main())
