"""What the tests share that is not a test: the programs they start and the helpers they call.

* ``preamble``: what the server programs the tests start share (graceful's log lines on
  stderr, a ``release`` event the test sets through the child's stdin, whole-line ``say``).
* ``web``: start a server child, real requests, how fast a new connection is refused.
* ``redis_server``: a real ``redis-server`` for the queue-worker tests (the ``rdb`` and
  ``redis_url`` fixtures, which ``tests/conftest.py`` makes visible).
* ``grpc_service``: the gRPC server programs and client helpers.
* ``asgi_app``, ``gunicorn_app``, ``gunicorn_conf``, ``celery_app``: the apps the hosts' tests
  run under a real server's command line (``tests.support.asgi_app:app``).
* ``load_client``: the client process of the load test.
* ``keepalive_client``, ``reaper``: the upgrade tests' kept-alive POST load, and the child
  subreaper their generations run under (tests/test_upgrade.py).
"""
