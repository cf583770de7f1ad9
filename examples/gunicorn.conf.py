"""A gunicorn config file of your own, with graceful's hooks: ``gunicorn -c examples/gunicorn.conf.py``.

The star import brings every hook graceful needs. A hook you define again replaces graceful's,
so call graceful's from yours, as ``post_worker_init`` and ``worker_exit`` do below.
"""

import graceful.gunicorn
from graceful.gunicorn import *  # noqa: F403 - gunicorn reads the hooks from this module's globals

workers = 2
graceful_timeout = 30  # graceful's budget in each worker: 29 s (unless GRACEFUL_FORCE_QUIT is set)
max_requests = 1000  # a recycled worker runs its listeners too
max_requests_jitter = 100


def post_worker_init(worker):
    graceful.gunicorn.post_worker_init(worker)  # first: the worker is watched from here on
    worker.log.info("worker %s ready", worker.pid)


def worker_exit(server, worker):
    server.log.info("worker %s: its loop has ended", worker.pid)
    graceful.gunicorn.worker_exit(server, worker)  # last: runs the shutdown listeners and waits
