"""gunicorn settings, picked up by `gunicorn app:app` run in this folder.

Each call holds one thread while it waits for the model (seconds). The default `sync` worker holds
one call per process and kills any request that outlasts `timeout`, so it would put callers in a
queue of dead air: use threads instead."""

import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from dotenv import load_dotenv

# gunicorn reads this file before it imports app.py: load .env here too, so that PORT and
# WEB_CONCURRENCY set there count.
load_dotenv(Path(__file__).with_name(".env"))


def whole_number(name, default, minimum, maximum=None):
    """A number setting, by contract.py's rule (which this file does not import: it loads the
    SDK, too much for gunicorn's master process): empty means the default, and a value that cannot
    be used stops gunicorn with one line (SystemExit: no traceback)."""
    text = os.getenv(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        expected = f"a whole number from {minimum}" + (f" to {maximum}" if maximum else "")
        sys.exit(f"Cannot start: {name}={text!r} in .env or the environment: expected {expected} "
                 f"(empty means the default, {default})")
    return value


bind = f"0.0.0.0:{whole_number('PORT', 8000, 1, 65535)}"
worker_class = "gthread"
# One process per core. A request holds a thread from its headers to its last byte, a request whose
# body is slow too (up to BODY_TIMEOUT_SECONDS): so many more threads than calls (at most
# MAX_CONCURRENT_CALLS, contract.py), that a flood of unfinished requests does not take them all.
# A waiting thread costs little; kept-alive connections wait in a poller, not in a thread.
workers = whole_number("WEB_CONCURRENCY", 2, 1)
threads = whole_number("GUNICORN_THREADS", 2048, 1)
worker_connections = 2 * threads
# A file descriptor per connection: raise the soft limit (often 1024) as far as the hard one.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < worker_connections + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (worker_connections + 100 if hard < 0
                                                else min(worker_connections + 100, hard), hard))
# Vapi and ngrok reuse connections between turns: keep idle ones open for a while.
keepalive = 30
# For gthread this is the worker heartbeat, not a limit on how long a stream may run.
timeout = 30
# app.py logs one line per request with the call id and timings: no access log to repeat it.
accesslog = None


def post_fork(server, worker):
    """Tell the app whether it is the first worker of a start or a reload, so that only that one
    logs the start-up summary and stops gunicorn on a wrong setting (contract.py FIRST_WORKER):
    simpler than logging from this master process, which never imports the app."""
    first = worker.age == getattr(server, "first_worker_age", 1)
    os.environ["GUNICORN_FIRST_WORKER"] = "1" if first else "0"


def on_reload(server):
    """In the master, before a reload starts new workers: the next one started is their first."""
    server.first_worker_age = server.worker_age + 1


# --- Deploys: reload (`kill -HUP`) and stop (`kill -TERM`) without cutting a call ---------------
# gunicorn tells each old worker to stop with SIGTERM: it stops accepting and waits for its
# connections. Left alone, a kept-alive connection would hold it until `keepalive` runs out, and a
# next turn sent on it meanwhile would be cut at `graceful_timeout`. So a draining worker closes
# every kept-alive connection with no request in flight (gthread does that itself, 2 s into the
# drain), and one with a call in flight is closed once that answer is sent: the caller's client
# reconnects, to a new worker on a reload, to another instance on a stop. The worker exits as soon
# as its last call ends (within a second). On a reload the old workers first keep serving until
# every new worker has imported the app, so new callers never wait on workers that are still
# booting. (`preload_app` would make booting instant, but then a reload would keep running the old
# code.)
graceful_timeout = 60  # the longest drain: a long turn is well under it
HANDOVER_SECONDS = 15  # on a reload, the longest old workers wait for the new ones to boot
CUT_BEFORE_SECONDS = 2  # calls still running this long before graceful_timeout are cut


def on_starting(server):
    """In the master: count the workers started and those that have loaded the app, in memory the
    workers share (kept on the arbiter, which outlives the re-reading of this file on a reload)."""
    server.worker_boots = multiprocessing.Array("i", [0, 0])


def pre_fork(server, worker):
    """In the master, before each worker starts: count it, and hand it the shared counts."""
    with server.worker_boots.get_lock():
        server.worker_boots[0] += 1
    worker.boots, worker.booted = server.worker_boots, multiprocessing.Value("b", 0)


def post_worker_init(worker):
    """In a worker that has loaded the app: count it as booted, and let Drain handle SIGTERM."""
    with worker.boots.get_lock():
        worker.boots[1] += 1
        worker.booted.value = 1
    worker.drain = Drain(worker)


def child_exit(server, worker):
    """In the master: a worker that exited before loading the app is no longer waited for."""
    with worker.boots.get_lock():
        if not worker.booted.value:
            worker.boots[0] -= 1


def pre_request(worker, req):
    """A request is in flight (its connection is not idle)."""
    worker.drain.started(req)


def post_request(worker, req, environ, resp):
    """A request has been answered (its connection may now wait, kept alive, for the next)."""
    worker.drain.ended(req, environ, resp)


class Drain:
    """One worker's requests in flight, and its way of stopping."""

    def __init__(self, worker):
        self.worker = worker
        self.in_flight = set()  # gunicorn's requests being answered
        self.told_to_stop = False
        self.stop = signal.getsignal(signal.SIGTERM)  # gunicorn's: stop accepting, then exit
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "told_to_stop", True))
        threading.Thread(target=self.run, daemon=True).start()  # a greenlet under gevent

    def started(self, req):
        """A request is being answered."""
        self.in_flight.add(req)

    def ended(self, req, environ, resp):
        """A request has been answered."""
        self.in_flight.discard(req)

    def run(self):
        """Wait for SIGTERM; on a reload, for the new workers to boot; then drain, and cut the
        calls still running just before graceful_timeout."""
        while not self.told_to_stop and self.worker.alive:
            time.sleep(0.1)
        told_at = time.monotonic()  # the master kills the worker graceful_timeout from now
        handover_ends = told_at + HANDOVER_SECONDS
        while self.new_workers_booting() and time.monotonic() < handover_ends:
            time.sleep(0.1)
        self.stop(signal.SIGTERM, None)
        cut_at = told_at + self.worker.cfg.graceful_timeout - CUT_BEFORE_SECONDS
        while time.monotonic() < cut_at:
            for req in list(self.in_flight):
                req.must_close = True  # "Connection: close", closed once its answer is sent
            time.sleep(0.1)
        import contract  # the app's, loaded by this worker
        contract.CALLS.cut()

    def new_workers_booting(self):
        """Whether the master started workers that have not loaded the app yet (a reload)."""
        started, booted = self.worker.boots
        return booted < started and os.getppid() == self.worker.ppid
